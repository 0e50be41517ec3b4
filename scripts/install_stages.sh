# Sourced by scripts/test.sh and examples/run_default.sh (after they set $VENV): installs that say what they do.
# Each stage prints one line (what it installs and about how long that takes), keeps the installer's own output in
# $INSTALL_LOG (its path is printed once), and prints how long it took; a failed stage prints the log's last lines
# and stops the script. Durations are from this project's 2-core VM when otherwise idle (2026-12-03: torch and the
# test extras took 2.5 minutes together); a busy machine takes many times longer (23.5 minutes at load 5-12).
INSTALL_LOG="${INSTALL_LOG:-$(cd "$VENV" && pwd)/install.log}"

# install_note: print where the installers' output goes (once, before the first stage).
install_note() {
    if [ -z "${_INSTALL_NOTED:-}" ]; then
        echo "Installers' output goes to $INSTALL_LOG"
        _INSTALL_NOTED=1
    fi
}

# install_stage WHAT ABOUT COMMAND...: "installing WHAT (ABOUT)", then COMMAND with its output in the log.
install_stage() {
    local what="$1" about="$2" start=$SECONDS
    shift 2
    install_note
    echo "installing $what ($about; longer on a busy machine) ..."
    echo "=== $(date -u '+%Y-%m-%d %H:%M:%S UTC') $*" >>"$INSTALL_LOG"
    if ! "$@" >>"$INSTALL_LOG" 2>&1; then
        echo "installing $what failed; the last lines of $INSTALL_LOG:" >&2
        tail -n 30 "$INSTALL_LOG" >&2
        exit 1
    fi
    echo "  done in $((SECONDS - start)) s"
}
