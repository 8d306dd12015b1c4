"""Records: the JSONL format, idx numbering, and a clear error for each kind of bad input."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from lcot.core.record import final_answer
from lcot.errors import LcotInputError
from lcot.pipeline.data import read_records


@pytest.fixture
def folder(tmp_path):
    Image.new("RGB", (32, 32), "red").save(tmp_path / "q.png")
    Image.new("RGBA", (32, 32), (0, 0, 255, 128)).save(tmp_path / "t.png")
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "text.png").write_text("not an image")
    return tmp_path


def good(**over):
    rec = {"question": "How many?", "answer": "two and one #### 3", "question_image_paths": ["q.png"],
           "thought_image_paths": ["t.png"]}
    rec.update(over)
    return rec


def write(folder, lines) -> str:
    path = folder / "data.jsonl"
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return str(path)


def test_reads_records_with_idx_skipping_blank_lines(folder):
    path = write(folder, [good(), "", "   ", good(question="Again?", question_image_paths=[], extra="ok")])
    recs = read_records(path)
    assert [r.idx for r in recs] == [0, 1]
    assert recs[1].where.endswith("data.jsonl:4")
    assert recs[0].final_answer == "3"
    assert recs[0].question_images == (folder / "q.png",)
    assert recs[1].question_images == ()
    assert recs[0].digest != recs[1].digest


def test_final_answer_is_after_the_last_marker():
    assert final_answer("a #### b #### 42 ") == "42"
    assert final_answer("x ####\n 1,000") == "1,000"


@pytest.mark.parametrize("line, message", [
    ("{not json", "malformed JSON"),
    ("[1, 2]", "expected a JSON object, got list"),
    (good(question=None), "field 'question' must be a str"),
    ({k: v for k, v in good().items() if k != "answer"}, "missing field 'answer'"),
    (good(question_image_paths="q.png"), "field 'question_image_paths' must be a list"),
    (good(thought_image_paths=[3]), "field 'thought_image_paths'[0] must be a non-empty string"),
    (good(answer="just 3"), "has no '####'"),
    (good(answer="3 ####  "), "empty final answer"),
    (good(question_image_paths=["missing.png"]), "image not found"),
    (good(question_image_paths=["empty.png"]), "image file is empty"),
    (good(thought_image_paths=["text.png"]), "not a readable image"),
])
def test_bad_input_names_file_line_and_field(folder, line, message):
    path = write(folder, [good(), line])
    with pytest.raises(LcotInputError) as err:
        read_records(path)
    text = str(err.value)
    assert f"{path}:2: " in text and message in text
    assert "hint" in text or "image" in text


def test_empty_thought_images_where_the_stage_needs_them(folder, capsys):
    path = write(folder, [good(), good(thought_image_paths=[])])
    assert len(read_records(path)) == 2
    with pytest.raises(LcotInputError, match=r"data.jsonl:2: field 'thought_image_paths' is empty"):
        read_records(path, need_thought_images=True)
    recs = read_records(path, need_thought_images=True, skip_missing_thought=True)
    assert [r.idx for r in recs] == [0]
    assert "skipped 1 record(s)" in capsys.readouterr().err


@pytest.mark.parametrize("content", ["", "\n\n  \n"])
def test_empty_jsonl(folder, content):
    path = folder / "data.jsonl"
    path.write_text(content)
    with pytest.raises(LcotInputError, match="no records"):
        read_records(path)


def test_rgba_images_are_converted_not_refused(folder):
    from lcot.core.record import load_image

    assert load_image(folder / "t.png").mode == "RGB"
