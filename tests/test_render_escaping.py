import pytest
from markdown_it import MarkdownIt
from render_support import HOSTILE_TOKENS

from lightning_sae_samples.render.escaping import markdown_emphasis, markdown_text, visible

MD = MarkdownIt("commonmark").enable("table")
NASTY = [*HOSTILE_TOKENS, "1.", "- item", "> quote", "===", "<http://x.y>", "&#60;", "a  b", "\u202eevil", "~~x~~", ""]


def inline_children(source):
    blocks = MD.parse(source)
    inline = [t for t in blocks if t.type == "inline"]
    assert len(inline) == 1, f"{source!r} became {[t.type for t in blocks]}"
    return inline[0].children


def test_visible_marks_whitespace_only_and_control_characters():
    assert visible(" ") == "·"
    assert visible("   ") == "···"
    assert visible("\n") == "⏎"
    assert visible("\t") == "→"
    assert visible("a\nb") == "a⏎b"
    assert visible(" Lord") == " Lord"  # spaces inside a word token stay spaces
    assert visible("") == "∅"
    assert visible("\u202e") == "\\u202e"  # bidi override cannot reorder the report


@pytest.mark.parametrize("token", NASTY)
def test_markdown_text_renders_literally_as_one_text_run(token):
    children = inline_children("x " + markdown_text(token) + " y")
    assert [c.type for c in children] == ["text"], children
    assert children[0].content == "x " + visible(token) + " y"


@pytest.mark.parametrize("token", NASTY)
@pytest.mark.parametrize("neighbours", [("a", "b"), ("*", "*"), ("", ""), ("\\", "|"), (" ", " "), (",", ".")])
@pytest.mark.parametrize("told", [False, True])
def test_emphasis_is_bold_whatever_the_neighbours(token, neighbours, told):
    left, right = ("x" + markdown_text(neighbours[0]), markdown_text(neighbours[1]) + "y")
    bold = markdown_emphasis(token, left, right) if told else markdown_emphasis(token)
    children = inline_children(left + bold + right)
    types = [c.type for c in children]
    assert types.count("strong_open") == 1 and "html_inline" not in types and "link_open" not in types
    inside = children[types.index("strong_open") + 1]
    assert inside.content == visible(token).strip(" ")


@pytest.mark.parametrize("token", NASTY)
def test_markdown_text_cannot_split_a_table_row(token):
    table = "| a | b |\n|---|---|\n| " + markdown_text(token) + " | z |\n"
    tokens = MD.parse(table)
    rows = [t for t in tokens if t.type == "tr_open"]
    cells = [t for t in tokens if t.type in ("td_open", "th_open")]
    assert len(rows) == 2 and len(cells) == 4
    assert not any(t.type.startswith("html") for t in tokens)


def test_markdown_text_leaves_ordinary_text_alone():
    assert markdown_text("mother's") == "mother's" and markdown_text("west,") == "west,"
    assert markdown_text("(see p. 3) - 50% off!") == "(see p. 3) - 50% off!"
    assert markdown_text("a\\b") == "a\\b" and markdown_text("a\\") == "a\\\\"  # escaped only before punctuation


def test_emphasis_adds_no_space_between_word_pieces():
    assert "She" + markdown_emphasis(" chem", "She", "istry") + "istry" == "She **chem**istry"
    assert "un" + markdown_emphasis("believ", "un", "able") + "able" == "un**believ**able"
