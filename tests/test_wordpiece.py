"""WordPiece training: official layout, reproducibility across processes, save/load round trip, clear
errors."""

import subprocess
import sys

import pytest
from tokenizers import Tokenizer, models, trainers

from models.text.wordpiece import (
    SPECIAL_TOKENS,
    empty_wordpiece,
    load_wordpiece,
    save_wordpiece,
    train_wordpiece,
)
from tests.real_data import REPO_ROOT, iu_xray_texts

CORPUS = [
    "There is no pleural effusion. Mild bibasilar atelectasis.",
    "No focal consolidation, pneumothorax or pleural effusion.",
    "Heart size is normal. The lungs are clear. No pneumothorax.",
    "Small left pleural effusions with adjacent atelectasis, unchanged since 2019.",
    "There is mild cardiomegaly. There may be pulmonary edema.",
    "Café-au-lait ÉFFUSION noted on the 12 views.",
] * 5


def test_special_token_ids_and_official_pipeline():
    tok = train_wordpiece(CORPUS, vocab_size=200, min_frequency=2)
    assert [tok.token_to_id(t) for t in SPECIAL_TOKENS] == [0, 1, 2, 3, 4]
    assert tok.get_vocab_size() <= 200
    # Lowercase + NFKD + StripAccents; Whitespace splits punctuation; Digits keeps digit runs together.
    assert tok.encode("ÉFFUSION.").tokens == tok.encode("effusion .").tokens
    assert tok.encode("2019").tokens == ["2019"]
    assert tok.encode("[CLS] no effusion").ids[0] == 2  # special tokens are recognised in text
    assert any(t.startswith("##") for t in tok.get_vocab())
    # Words seen often enough become single tokens.
    assert tok.encode("pleural effusion").tokens == ["pleural", "effusion"]


def test_vocabulary_is_the_wordpiece_trainer_one_up_to_ties():
    """Same merge algorithm as tokenizers' WordPieceTrainer: on real reports the vocabularies agree except
    ties."""
    reports = iu_xray_texts()
    ours = set(train_wordpiece(reports, vocab_size=1000).get_vocab())
    ref = empty_wordpiece()
    trainer = trainers.WordPieceTrainer(vocab_size=1000, min_frequency=2, special_tokens=list(SPECIAL_TOKENS))
    ref.train_from_iterator(reports, trainer=trainer)
    theirs = set(ref.get_vocab())
    assert len(ours) == len(theirs) == 1000
    assert len(ours & theirs) >= 980
    assert {"pneumothorax", "effusion", "atelectasis", "there", "no"} <= ours


def test_training_is_reproducible_across_processes(tmp_path):
    """The hash-order bug of the Rust trainer shows up between processes, so train in two fresh ones."""
    script = (
        "import sys; from models.text.wordpiece import train_wordpiece, save_wordpiece; "
        "from tests.test_wordpiece import CORPUS; "
        "save_wordpiece(train_wordpiece(CORPUS, vocab_size=120), sys.argv[1])"
    )
    outputs = []
    for i in range(2):
        out = tmp_path / f"tok{i}.json"
        subprocess.run([sys.executable, "-c", script, str(out)], cwd=REPO_ROOT, check=True)
        outputs.append(out.read_text())
    assert outputs[0] == outputs[1]


def test_save_load_round_trip(tmp_path):
    tok = train_wordpiece(CORPUS, vocab_size=120)
    path = save_wordpiece(tok, tmp_path / "sub" / "wordpiece.json")
    loaded = load_wordpiece(path)
    text = "Small left pleural effusion, no pneumothorax."
    assert loaded.encode(text).ids == tok.encode(text).ids
    assert loaded.decode(loaded.encode("mild atelectasis").ids) == "mild atelectasis"


def test_errors_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match="no non-empty text"):
        train_wordpiece(["", "   "], vocab_size=100)
    with pytest.raises(ValueError, match="must exceed the 5 special tokens"):
        train_wordpiece(CORPUS, vocab_size=5)
    with pytest.raises(ValueError, match="min_frequency=0"):
        train_wordpiece(CORPUS, vocab_size=100, min_frequency=0)
    with pytest.raises(FileNotFoundError, match="missing.json"):
        load_wordpiece(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="bad.json: not a valid tokenizers JSON"):
        load_wordpiece(bad)
    # A tokenizer whose special tokens sit elsewhere (e.g. the official file has no [SEP]) is refused.
    other = Tokenizer(models.WordPiece(vocab={"[UNK]": 0, "[PAD]": 1, "a": 2}, unk_token="[UNK]"))
    other.save(str(tmp_path / "other.json"))
    with pytest.raises(ValueError, match=r"other.json: special token \[PAD\] has id 1, expected 0"):
        load_wordpiece(tmp_path / "other.json")
