"""Your own text as a corpus: one big file is many documents (EOS between them, validation a
sample of whole documents), a .jsonl that is not prompt/answer pairs says how to convert it,
relative paths are read from the working directory."""

import json

import pytest

from blockdiff.data.corpus import DOC_CHARS, DOC_SEPARATOR, load_corpus, pack, split_documents


def paragraphs(n: int, size: int = 300) -> list[str]:
    return [f"Paragraph {i}. " + "words and more words " * (size // 21) + "\n" for i in range(n)]


def test_blank_line_paragraphs_merge_up_to_the_size():
    pars = paragraphs(10)
    docs = split_documents("\n".join(pars), max_chars=700)
    assert docs == [pars[0] + "\n" + pars[1], pars[2] + "\n" + pars[3], pars[4] + "\n" + pars[5],
                    pars[6] + "\n" + pars[7], pars[8] + "\n" + pars[9]]  # fmt: skip
    assert all(len(d) <= 700 for d in docs)
    assert split_documents("one long paragraph\n" * 3, max_chars=10) == ["one long paragraph\n" * 3]
    assert split_documents("\n\n".join(pars)) == ["\n".join(pars[:6]), "\n".join(pars[6:])]  # DOC_CHARS


def test_separator_lines_are_the_documents():
    text = f"first doc\n\nstill first\n{DOC_SEPARATOR}\nsecond\n  {DOC_SEPARATOR}  \n\n"
    assert split_documents(text) == ["first doc\n\nstill first\n", "second\n"]


def test_one_big_file_is_many_documents_with_eos_and_a_spread_validation(tmp_path, tok):
    f = tmp_path / "book.txt"
    pars = paragraphs(400)
    f.write_text("\n".join(pars))
    c = load_corpus(f, val_fraction=0.05)
    n_docs = len(c.train) + len(c.val)
    assert n_docs == len(split_documents(f.read_text())) > 40
    assert len(c.val) == n_docs // 20  # every 20th document, whole
    assert pars[0] in c.train[0] and pars[-1] in c.train[-1] + c.val[-1]
    first_val = int(c.val[0].split(".")[0].split()[-1])  # a sample from all over the file, not its end
    assert first_val < len(pars) // 2
    assert all(len(d) <= DOC_CHARS for d in c.train)
    rows = pack([tok.encode(d) for d in c.train], 256, tok.eos_id)
    assert (rows == tok.eos_id).sum() >= len(c.train) - 1  # the model sees documents end


def test_a_folder_keeps_one_document_per_file(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.txt").write_text("\n".join(paragraphs(50)))
    c = load_corpus(tmp_path / "d")
    assert len(c.train) == len(c.val) == 1  # the last lines of the one document are validation


@pytest.mark.parametrize(
    "row,says",
    [
        ({"text": "a story", "id": 3}, "this line has keys ['id', 'text']"),
        ({"question": "q", "response": "r"}, "print(json.loads(l)['question']"),
        (["prompt", "answer"], "this line has a JSON list"),
        ({"prompt": "p", "answer": 3}, "string keys 'prompt' and 'answer'"),
    ],
)
def test_jsonl_that_is_not_pairs_says_how_to_convert(tmp_path, row, says):
    f = tmp_path / "data.jsonl"
    f.write_text(json.dumps({"prompt": "p", "answer": "a"}) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(ValueError) as e:
        load_corpus(f)
    msg = str(e.value)
    assert msg.startswith(f"{f}:2: a .jsonl corpus is prompt/answer pairs") and says in msg
    assert "Rename the keys to prompt/answer" in msg and DOC_SEPARATOR in msg and "\n" not in msg


def test_jsonl_conversion_hint_gives_a_corpus_that_loads(tmp_path, monkeypatch):
    """The command in the hint, run as printed, turns text rows into a one-file corpus."""
    import shlex
    import subprocess
    import sys

    src = tmp_path / "IN.jsonl"
    src.write_text("".join(json.dumps({"text": f"story {i}\nthe end"}) + "\n" for i in range(30)))
    with pytest.raises(ValueError) as e:
        load_corpus(src)
    cmd = str(e.value).split("after each document: ")[1]
    monkeypatch.chdir(tmp_path)
    cmd = cmd.replace("python -c", shlex.quote(sys.executable) + " -c", 1)
    subprocess.run(cmd, shell=True, check=True, cwd=tmp_path)
    c = load_corpus("corpus.txt")
    assert sorted(c.train + c.val) == sorted(f"story {i}\nthe end\n" for i in range(30))


def test_relative_corpus_is_read_from_the_working_directory(tmp_path, monkeypatch):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.md").write_text("some notes\n" * 40)
    monkeypatch.chdir(tmp_path)
    assert load_corpus("notes").name == "notes"
    monkeypatch.chdir(tmp_path / "notes")
    with pytest.raises(FileNotFoundError, match="relative paths are read from the working directory"):
        load_corpus("notes")


def test_pairs_padded_with_masks_score_only_the_answer_and_its_eos():
    from blockdiff.data.corpus import pack_pairs
    from blockdiff.tokenizer import byte_tokenizer

    tok = byte_tokenizer()
    pairs = [("12=", "34"), ("5=", "6", False)]
    ids, mask = pack_pairs(tok, pairs, 8, pad="mask")
    e, m = tok.eos_id, tok.mask_id
    assert ids[0].tolist() == [ord("1"), ord("2"), ord("="), ord("3"), ord("4"), e, m, m]
    assert mask[0].tolist() == [False] * 3 + [True] * 3 + [False] * 2
    # an answer cut at a length limit stays right-aligned, EOS before it, no EOS after it
    assert ids[1].tolist() == [e] * 5 + [ord("5"), ord("="), ord("6")]
    assert mask[1].tolist() == [False] * 7 + [True]
    ids_eos, mask_eos = pack_pairs(tok, pairs, 8)
    assert ids_eos[0].tolist()[6:] == [e, e] and mask_eos[0].tolist()[3:] == [True] * 5
