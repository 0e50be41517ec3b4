"""Explanations made elsewhere, into the sidecar: delphi's explanation files and Neuronpedia explanation exports.

- **delphi** writes one file per latent, ``explanations/<module>_latent<N>.txt``, holding the explanation as a
  JSON string, and its detection scores beside it in ``scores/detection/<same name>.txt``: a JSON list of
  ``{"activating": bool, "prediction": bool, ...}``, one per context. The score imported is their balanced
  accuracy, as ``explain`` computes it.
- **Neuronpedia** exports explanations as rows with ``index``, ``description``, ``explanationModelName`` and
  ``typeName`` (its S3 bulk export ``explanations/batch-N.jsonl.gz``, and the older API's JSON array).

Every file is read as untrusted: a bad row stops the import with an error naming the file, the row and the field,
and nothing of that import is written.
"""

from __future__ import annotations

import gzip
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Optional

from lightning_sae_samples.analysis.explanations import MAX_TEXT_CHARS, ExplanationRecord, append_explanations
from lightning_sae_samples.explain.scoring import balanced_accuracy
from lightning_sae_samples.samples_dir.files import is_plain_file
from lightning_sae_samples.samples_dir.names import PathLike, SamplesDirectoryError
from lightning_sae_samples.samples_dir.reader import read_one_save, read_samples_dir

IMPORT_FORMATS = ("auto", "delphi", "neuronpedia")
_DELPHI_NAME = re.compile(r"^(?:(?P<module>.+)_latent)?(?P<latent>\d+)\.txt$")
#: Largest import file read (a Neuronpedia export of a 1M-latent SAE is far smaller).
MAX_IMPORT_BYTES = 2 << 30


class ImportFormatError(SamplesDirectoryError):
    """A file to import is not in the format it claims (the message names the file, row and field)."""


def _read_bytes(path: Path) -> bytes:
    if not is_plain_file(path):
        raise ImportFormatError(f"{path} is not a regular file (links are not followed).")
    if path.stat().st_size > MAX_IMPORT_BYTES:
        raise ImportFormatError(f"{path} is larger than {MAX_IMPORT_BYTES} bytes; split it.")
    data = path.read_bytes()
    if path.name.endswith(".gz"):
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError) as err:
            raise ImportFormatError(f"{path} is not a valid gzip file: {err}.") from err
    return data


def _json(text: str, where: str) -> Any:
    try:
        return json.loads(text, parse_constant=lambda name: (_ for _ in ()).throw(ValueError(f"{name} not allowed")))
    except ValueError as err:
        raise ImportFormatError(f"{where}: not valid JSON ({err}).") from err
    except RecursionError:
        raise ImportFormatError(f"{where}: not valid JSON (nested too deeply).") from None


def _text(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise ImportFormatError(f"{where}: the explanation must be a string, got {type(value).__name__}.")
    text = " ".join(value.split())
    if len(text) > MAX_TEXT_CHARS:
        raise ImportFormatError(f"{where}: the explanation is longer than {MAX_TEXT_CHARS} characters.")
    return text


def _latent(value: Any, num_latents: int, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, str)) or not str(value).isdigit():
        raise ImportFormatError(f"{where}: field `index` must be a non-negative integer, got {value!r:.60}.")
    latent = int(value)
    if latent >= num_latents:
        raise ImportFormatError(f"{where}: latent {latent} does not exist (the run tracked {num_latents}).")
    return latent


# ---------------------------------------------------------------------------------------------------- delphi
def _delphi_files(source: Path, module: Optional[str]) -> list[tuple[Path, int]]:
    files = [source] if source.is_file() else sorted(p for p in source.iterdir() if p.name.endswith(".txt"))
    found: dict[str, list[tuple[Path, int]]] = {}
    for path in files:
        match = _DELPHI_NAME.fullmatch(path.name)
        if match is None:
            raise ImportFormatError(f"{path}: not a delphi explanation file name (<module>_latent<N>.txt).")
        found.setdefault(match.group("module") or "", []).append((path, int(match.group("latent"))))
    if module is not None:
        return found.get(module, [])
    if len(found) > 1:
        raise ImportFormatError(
            f"{source} holds explanations of several modules ({', '.join(sorted(found))}); pass the one this"
            " samples directory belongs to (module=... / --module)."
        )
    return next(iter(found.values()), [])


def _delphi_score(path: Path) -> tuple[Optional[float], Optional[int]]:
    if not is_plain_file(path):
        return None, None
    rows = _json(_read_bytes(path).decode("utf-8", errors="strict"), str(path))
    if not isinstance(rows, list):
        raise ImportFormatError(f"{path}: a delphi score file holds a list of contexts, got {type(rows).__name__}.")
    truth, guess = [], []
    for n, row in enumerate(rows):
        if not isinstance(row, dict) or not isinstance(row.get("activating"), bool):
            raise ImportFormatError(f"{path}, context {n}: field `activating` must be true or false.")
        prediction = row.get("prediction")
        if prediction is None:
            continue  # delphi writes null when the model's answer could not be read
        if not isinstance(prediction, bool):
            raise ImportFormatError(f"{path}, context {n}: field `prediction` must be true, false or null.")
        truth.append(row["activating"])
        guess.append(prediction)
    return (balanced_accuracy(truth, guess), len(truth)) if truth else (None, 0)


def delphi_records(source: Path, num_latents: int, step: int, model: str, module: Optional[str] = None
                   ) -> Iterator[ExplanationRecord]:
    """The records of a delphi ``explanations`` folder (or one file), with scores from ``../scores/detection``."""
    run_dir = source.parent if source.is_dir() else source.parent.parent
    scores_dir = run_dir / "scores" / "detection"
    for path, latent in _delphi_files(source, module):
        raw = _read_bytes(path).decode("utf-8", errors="replace")
        try:
            value = json.loads(raw)
        except (ValueError, RecursionError):
            value = raw
        text = _text(value, str(path))
        if latent >= num_latents:
            raise ImportFormatError(f"{path}: latent {latent} does not exist (the run tracked {num_latents}).")
        score, contexts = _delphi_score(scores_dir / path.name)
        if text:
            yield ExplanationRecord(latent=latent, text=text, score=score, score_contexts=contexts, model=model,
                                    samples_step=step, source="delphi")


# ----------------------------------------------------------------------------------------------- Neuronpedia
def _neuronpedia_rows(source: Path) -> Iterator[tuple[str, Any]]:
    if source.is_dir():
        folder = source / "explanations" if (source / "explanations").is_dir() else source
        files = sorted((p for p in folder.iterdir() if re.fullmatch(r"batch-\d+\.jsonl(\.gz)?", p.name)),
                       key=lambda p: int(re.findall(r"\d+", p.name)[0]))
        if not files:
            raise ImportFormatError(f"{folder} holds no Neuronpedia explanation batches (batch-N.jsonl.gz).")
    else:
        files = [source]
    for path in files:
        data = _read_bytes(path).decode("utf-8", errors="strict")
        if path.name.endswith((".jsonl", ".jsonl.gz")):
            for n, line in enumerate(data.splitlines(), 1):
                if line.strip():
                    yield f"{path}, line {n}", _json(line, f"{path}, line {n}")
            continue
        document = _json(data, str(path))
        rows = document.get("explanations") if isinstance(document, dict) else document
        if not isinstance(rows, list):
            raise ImportFormatError(f"{path}: expected a list of explanations (or {{\"explanations\": [...]}}).")
        for n, row in enumerate(rows):
            yield f"{path}, row {n}", row


def neuronpedia_records(source: Path, num_latents: int, step: int, model: str) -> Iterator[ExplanationRecord]:
    """The records of a Neuronpedia explanation export."""
    for where, row in _neuronpedia_rows(source):
        if not isinstance(row, dict):
            raise ImportFormatError(f"{where}: expected an object, got {type(row).__name__}.")
        if "index" not in row or "description" not in row:
            raise ImportFormatError(f"{where}: missing field `{'index' if 'index' not in row else 'description'}`.")
        latent = _latent(row["index"], num_latents, where)
        text = _text(row["description"], where)
        name = row.get("explanationModelName") or model
        if not isinstance(name, str):
            raise ImportFormatError(f"{where}: field `explanationModelName` must be a string.")
        if text:
            yield ExplanationRecord(latent=latent, text=text, model=name[:1000], samples_step=step,
                                    source="neuronpedia")


def guess_format(source: Path) -> str:
    """``delphi`` for ``*.txt`` files (or a folder of them), else ``neuronpedia``."""
    if source.is_dir():
        names = [p.name for p in source.iterdir()]
        return "delphi" if any(_DELPHI_NAME.fullmatch(n) for n in names) else "neuronpedia"
    return "delphi" if source.name.endswith(".txt") else "neuronpedia"


def import_explanations(samples_dir: PathLike, source: PathLike, fmt: str = "auto", model: Optional[str] = None,
                        module: Optional[str] = None) -> tuple[int, str]:
    """Append the explanations of a delphi or Neuronpedia file (or folder) to the sidecar of ``samples_dir``.

    Returns:
        How many records were added, and the format read.

    Raises:
        ImportFormatError: A file is not in the format (nothing is written then).
        SamplesDirectoryError: ``samples_dir`` is not a samples directory.
    """
    if fmt not in IMPORT_FORMATS:
        raise ValueError(f"format must be one of {', '.join(IMPORT_FORMATS)}, got {fmt!r}")
    directory, _ = read_one_save(samples_dir, lambda: read_samples_dir(samples_dir))
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist.")
    kind = guess_format(path) if fmt == "auto" else fmt
    num_latents = int(directory.summary.get("num_features_tracked", 0))
    step = int(directory.summary.get("global_step", 0))
    if kind == "delphi":
        records = list(delphi_records(path, num_latents, step, model or "", module))
    else:
        records = list(neuronpedia_records(path, num_latents, step, model or ""))
    return append_explanations(directory.path, records), kind
