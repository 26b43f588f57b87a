"""ECAMP text masking: descriptor masking, re-balancing (Eq. 3-4), whole-word masking, composition, quirks."""

import importlib.util

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tokenizers import models

from models.text.masking import (
    IGNORE_INDEX,
    OfficialQuirks,
    TextCollator,
    TextMaskingConfig,
    collate,
    read_entity_words,
    weighted_mlm_loss,
)
from models.text.wordpiece import SPECIAL_TOKENS, CachedEncoder, empty_wordpiece, padded_rows, train_wordpiece
from tests.real_data import REPO_ROOT, iu_xray_texts

torch.set_num_threads(1)
HANDWRITTEN = [
    "There is no pleural effusion. Mild bibasilar atelectasis, no pneumothorax.",
    "There may be mild pulmonary edema. The heart is normal.",
    "No focal consolidation. Small left effusions.",
    "Pneumothorax. Effusion is present.",
    "Stable cardiomegaly without congestion.",
    "Heart size normal, lungs clear.",
]
ENTITY_WORDS = read_entity_words()


@pytest.fixture(scope="module")
def tokenizer():
    # A small vocabulary, so many words (incl. entity words) are split into several '##' pieces.
    return train_wordpiece(HANDWRITTEN * 3 + iu_xray_texts()[:300], vocab_size=300)


def words_of(tokenizer, batch, row):
    """[(pieces, positions)] per word of a row, rebuilt from the tokens (the test's own, loop-based view)."""
    words = []
    for t, token_id in enumerate(batch.token_ids[row]):
        token = tokenizer.id_to_token(int(token_id))
        if token in ("[CLS]", "[PAD]"):
            continue
        if token.startswith("##"):
            words[-1][0].append(token)
            words[-1][1].append(t)
        else:
            words.append(([token], [t]))
    return [("".join(p.removeprefix("##") for p in pieces), pos) for pieces, pos in words]


def masked_words(tokenizer, batch, row):
    return [w for w, pos in words_of(tokenizer, batch, row) if batch.masked[row, pos[0]]]


def make(tokenizer, **overrides):
    cfg = TextMaskingConfig(text_composition="origin", max_len=64, **overrides)
    return TextCollator(tokenizer, cfg, ENTITY_WORDS)


def test_descriptors_always_masked_never_across_sentence_end(tokenizer):
    collator = make(tokenizer, mask_rate=0.0)  # only the forced descriptor masking remains
    batch = collator.mask([(t, None) for t in HANDWRITTEN], np.random.default_rng(0))
    assert masked_words(tokenizer, batch, 0) == ["no", "pleural", "mild", "bibasilar", "atelectasis", "no"]
    assert masked_words(tokenizer, batch, 1) == ["mild", "pulmonary"]
    assert masked_words(tokenizer, batch, 2) == ["no", "focal", "small", "left"]
    # "Pneumothorax. Effusion is present.": the word before "effusion" is in the previous sentence.
    assert masked_words(tokenizer, batch, 3) == []
    # Descriptors are positional: an entity word can describe the next entity.
    assert masked_words(tokenizer, batch, 4) == ["stable", "cardiomegaly", "without"]
    assert masked_words(tokenizer, batch, 5) == []
    assert not batch.masked[:, 0].any()  # [CLS] is never masked


def test_negative_cue_weights_and_eq3_exact_on_handwritten(tokenizer):
    collator = make(tokenizer, mask_rate=0.0, negative_scope="cue")
    batch = collator.mask([(t, None) for t in HANDWRITTEN], np.random.default_rng(0))
    weights = {w: batch.weights[0, pos[0]] for w, pos in words_of(tokenizer, batch, 0)}
    # Row 0 descriptor pieces: no(neg) pleural mild bibasilar atelectasis(other, pieces) no(neg).
    n_other = int((batch.descriptor[0] & ~batch.negative[0]).sum())
    lambda_oth = (n_other + 2 - 0.05 * 2) / n_other
    assert weights["no"] == pytest.approx(0.05)
    assert weights["pleural"] == pytest.approx(lambda_oth)
    assert batch.weights[0][batch.descriptor[0]].sum() == pytest.approx(batch.descriptor[0].sum())
    # Row 4: "stable", "cardiomegaly" are other descriptors, "without" a negative one: 0.05 + λ_oth·N_oth =
    # N_a.
    d4 = batch.descriptor[4]
    assert batch.weights[4][d4 & batch.negative[4]] == pytest.approx(0.05)
    assert batch.weights[4][d4].sum() == pytest.approx(d4.sum())
    # Labels: original ids on masked pieces only; weights 0 elsewhere.
    assert (batch.labels[batch.masked] == batch.token_ids[batch.masked]).all()
    assert (batch.labels[~batch.masked] == IGNORE_INDEX).all()
    assert (batch.weights[~batch.masked] == 0).all()


def test_all_negative_descriptors_keep_lambda_neg(tokenizer):
    """N_oth = 0: no λ_oth exists; negatives keep λ_neg (they are the majority the factor down-weights)."""
    batch = make(tokenizer, mask_rate=0.0).mask([("There is no effusion.", None)], np.random.default_rng(0))
    assert masked_words(tokenizer, batch, 0) == ["is", "no"]
    assert batch.weights[0][batch.descriptor[0]].tolist() == pytest.approx([0.05, 0.05])


def test_eq3_holds_exactly_per_sample_on_real_reports(tokenizer):
    reports = iu_xray_texts()[:256]
    distilled = [f"There is {w}." if i % 3 else None for i, w in enumerate(ENTITY_WORDS * 3)][:256]
    collator = TextCollator(tokenizer, TextMaskingConfig(max_len=128), ENTITY_WORDS)
    out = collator.mask(list(zip(reports, distilled, strict=True)), np.random.default_rng(3))
    pred = out.labels != IGNORE_INDEX
    desc, neg = out.descriptor & pred, out.negative & out.descriptor & pred
    n_a, n_neg, n_oth = desc.sum(1), neg.sum(1), (desc & ~neg).sum(1)
    rows = n_oth > 0
    assert rows.sum() > 100
    assert np.allclose((out.weights * desc).sum(1)[rows], n_a[rows], atol=1e-9)  # Eq. 3
    assert np.allclose(0.05 * n_neg[rows] + (out.weights * (desc & ~neg)).sum(1)[rows], n_a[rows])
    assert (out.weights[neg] == 0.05).all()
    assert (out.weights[pred & ~out.descriptor] == 1.0).all()  # randomly masked pieces weigh 1
    assert (out.weights[~pred] == 0.0).all()
    # The float32 tensors the model sees keep Eq. 3 to float precision.
    w32 = out.as_tensors()["weights"].numpy()[:, : desc.shape[1]]
    assert np.allclose((w32 * desc).sum(1)[rows], n_a[rows], rtol=1e-5)
    # Non-descriptor words are masked at mask_rate (Bernoulli per word).
    starts = pred & ~out.descriptor
    words = (out.token_ids > 4) & ~out.descriptor
    rate = starts.sum() / words.sum()
    assert 0.70 < rate < 0.80


def test_whole_word_masking_is_consistent(tokenizer):
    texts = [(r, None) for r in iu_xray_texts()[:64]]
    batch = make(tokenizer).mask(texts, np.random.default_rng(5))
    multi_piece = 0
    for row in range(len(texts)):
        for _, pos in words_of(tokenizer, batch, row):
            multi_piece += len(pos) > 1
            assert len(set(batch.masked[row, pos])) == 1
            assert len(set(batch.descriptor[row, pos])) == 1
            assert len(set(batch.negative[row, pos])) == 1
            if batch.masked[row, pos[0]]:
                assert (batch.input_ids[row, pos] == tokenizer.token_to_id("[MASK]")).all()
            else:
                assert (batch.input_ids[row, pos] == batch.token_ids[row, pos]).all()
    assert multi_piece > 50  # the small vocabulary really produced '##' words


def test_deterministic_by_seed(tokenizer):
    collator = TextCollator(tokenizer, TextMaskingConfig(max_len=64), ENTITY_WORDS)
    pairs = [(t, "There may be edema.") for t in HANDWRITTEN]
    a = collator(pairs, np.random.default_rng(11))
    b = collator(pairs, np.random.default_rng(11))
    c = collator(pairs, np.random.default_rng(12))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["input_ids"], c["input_ids"])
    # The convenience function builds the same collator: same output.
    d = collate(pairs, tokenizer, TextMaskingConfig(max_len=64), np.random.default_rng(11), ENTITY_WORDS)
    assert all(torch.equal(a[k], d[k]) for k in a)


def test_output_contract(tokenizer):
    out = make(tokenizer)([(t, None) for t in HANDWRITTEN], np.random.default_rng(0))
    assert set(out) == {"input_ids", "attention_mask", "labels", "weights"}
    for key, dtype in [("input_ids", torch.long), ("attention_mask", torch.long), ("labels", torch.long)]:
        assert out[key].dtype == dtype and out[key].shape == (6, 64)
    assert out["weights"].dtype == torch.float32 and out["weights"].shape == (6, 64)
    assert (out["input_ids"][:, 0] == tokenizer.token_to_id("[CLS]")).all()
    lengths = out["attention_mask"].sum(1)
    assert lengths[5] == 1 + len(tokenizer.encode(HANDWRITTEN[5]).ids)
    assert (out["input_ids"][5, lengths[5] :] == 0).all()  # [PAD] after the text


def test_unknown_pieces_are_ordinary_words(tokenizer):
    """[UNK] (a character the vocabulary lacks) is text: attended, maskable, and counts as a word."""
    batch = make(tokenizer, mask_rate=1.0).mask([("No § effusion.", None)], np.random.default_rng(0))
    unk = tokenizer.token_to_id("[UNK]")
    assert unk in batch.token_ids[0].tolist()
    at = batch.token_ids[0].tolist().index(unk)
    assert batch.attention_mask[0, at] == 1 and batch.masked[0, at] and batch.labels[0, at] == unk
    assert batch.descriptor[0, at]  # "§" and "no" are the two words before "effusion"


def test_negation_words_follow_the_shared_cue_table(tokenizer):
    """Negative words: those of the entity matcher's negating cues, unless a pseudo or uncertainty cue holds
    them."""
    texts = [
        "Lungs are clear without evidence of effusion.",
        "No change in the effusion.",
        "Effusion can not be excluded.",
        "Non calcified granuloma.",
    ]
    batch = make(tokenizer, negative_scope="cue").mask([(t, None) for t in texts], np.random.default_rng(0))
    negative = [
        [w for w, pos in words_of(tokenizer, batch, row) if batch.negative[row, pos[0]]]
        for row in range(len(texts))
    ]
    assert negative == [["without", "evidence", "of"], [], [], ["non"]]


def negative_descriptors(tokenizer, texts: list[str], scope: str) -> list[list[str]]:
    batch = make(tokenizer, mask_rate=0.0, negative_scope=scope).mask(
        [(t, None) for t in texts], np.random.default_rng(0)
    )
    return [
        [w for w, pos in words_of(tokenizer, batch, row) if (batch.negative & batch.descriptor)[row, pos[0]]]
        for row in range(len(texts))
    ]


def test_mention_scope_makes_every_descriptor_of_a_negated_mention_negative(tokenizer):
    """Issue 12 point 5: T_neg = the β descriptors of each mention stage 2 marks negative (the paper's
    intent); the official cue scope takes only the cue's own words, so "pleural" of a denied effusion weighs
    λ_oth > 1."""
    texts = [
        "There is no pleural effusion. Mild bibasilar atelectasis, no pneumothorax.",
        "No focal consolidation. Small left effusions.",
        "The small effusion has resolved.",  # a negating cue after the entity (stage 2's post cue)
        "No change in the effusion.",  # a pseudo cue: not negated
        "Stable cardiomegaly without congestion.",
    ]
    assert negative_descriptors(tokenizer, texts, "mention") == [
        ["no", "pleural", "atelectasis", "no"],
        ["no", "focal"],
        ["the", "small"],
        [],
        ["cardiomegaly", "without"],
    ]  # "atelectasis, no pneumothorax": positional descriptors, an entity word among them
    assert negative_descriptors(tokenizer, texts, "cue") == [["no", "no"], ["no"], [], [], ["without"]]
    from models.resources import DEFAULT_ENTITY_LIST  # the same mentions are negative in stage 2
    from models.text.entities import EntityMatcher, load_entity_list

    mentions = EntityMatcher(load_entity_list(DEFAULT_ENTITY_LIST)).match(
        [str(i) for i in range(len(texts))], texts
    )
    negated = sorted(
        (int(m["study_id"]), m["entity"]) for m in mentions.to_pylist() if m["polarity"] == "negative"
    )
    assert negated == [
        (0, "effusion"),
        (0, "pneumothorax"),
        (1, "consolidation"),
        (2, "effusion"),
        (4, "congestion"),
    ]
    batch = make(tokenizer, mask_rate=0.0).mask([(texts[0], None)], np.random.default_rng(0))
    weights = {w: batch.weights[0, pos[0]] for w, pos in words_of(tokenizer, batch, 0)}
    d = batch.descriptor[0]
    n_neg, n_oth = int((d & batch.negative[0]).sum()), int((d & ~batch.negative[0]).sum())
    assert weights["pleural"] == pytest.approx(0.05) and weights["no"] == pytest.approx(0.05)
    assert weights["mild"] == pytest.approx((n_neg + n_oth - 0.05 * n_neg) / n_oth)  # Eq. 3 on the rest
    assert batch.weights[0][d].sum() == pytest.approx(d.sum())


def composed(tokenizer, pairs, rng, **overrides) -> list[str]:
    """Each sample's composed text, decoded from its pieces ([CLS] dropped; whitespace-insensitive)."""
    cfg = TextMaskingConfig(max_len=128, mask_rate=0.0, **overrides)
    batch = TextCollator(tokenizer, cfg, ENTITY_WORDS).mask(pairs, rng)
    return [
        tokenizer.decode(row[1:n].tolist())
        for row, n in zip(batch.token_ids, batch.attention_mask.sum(1), strict=True)
    ]


def spelled(tokenizer, text: str) -> str:
    return tokenizer.decode(tokenizer.encode(text).ids)


def test_composition_modes(tokenizer):
    pairs = [("Heart normal. No effusion.", "There is no effusion."), ("Lungs clear.", None)]
    rng = np.random.default_rng(0)
    origin = composed(tokenizer, pairs, rng, text_composition="origin")
    assert origin == [spelled(tokenizer, "Heart normal. No effusion."), spelled(tokenizer, "Lungs clear.")]
    with pytest.raises(ValueError, match=r"text_composition='distilled' but batch items \[1\]"):
        composed(tokenizer, pairs, rng, text_composition="distilled")
    distilled = composed(tokenizer, pairs[:1], rng, text_composition="distilled")
    assert distilled == [spelled(tokenizer, "There is no effusion.")]
    always = composed(tokenizer, pairs, rng, p_insert_distilled=1.0)
    assert always[1] == spelled(tokenizer, "Lungs clear.")  # nothing to insert
    options = [
        "There is no effusion. Heart normal. No effusion.",
        "Heart normal. There is no effusion. No effusion.",
        "Heart normal. No effusion. There is no effusion.",
    ]
    assert always[0] in [spelled(tokenizer, o) for o in options]
    never = composed(tokenizer, pairs, rng, p_insert_distilled=0.0)
    assert never == origin
    # p = 0.8, and the 3 boundaries used uniformly.
    many = composed(tokenizer, [pairs[0]] * 3000, np.random.default_rng(1))
    counts = [many.count(spelled(tokenizer, o)) / 3000 for o in options]
    assert 0.77 < sum(counts) < 0.83
    assert all(0.23 < c < 0.31 for c in counts)
    # An unterminated original gets its '.', so a descriptor window cannot run into the inserted text.
    end = composed(
        tokenizer, [("No effusion", "There may be edema")], np.random.default_rng(0), p_insert_distilled=1.0
    )
    assert end[0] in [
        spelled(tokenizer, t) for t in ("There may be edema. No effusion", "No effusion. There may be edema.")
    ]
    with pytest.raises(ValueError, match=r"batch item 1: expected \(original: str, distilled: str \| None\)"):
        composed(tokenizer, [("a", None), "just a string"], rng)


def hand_tokenizer():
    """A hand-made vocabulary: 'effusional' is 'effusion' + '##al', so truncation can cut an entity-like
    prefix."""
    tok = empty_wordpiece()
    pieces = (*SPECIAL_TOKENS, "no", "effusion", "##al", "##s", ".", "there", "is")
    tok.model = models.WordPiece(vocab={p: i for i, p in enumerate(pieces)}, unk_token="[UNK]")
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    return tok


def test_truncation_to_max_len(tokenizer):
    long_text = " ".join(["There is no pleural effusion."] * 40)
    collator = TextCollator(tokenizer, TextMaskingConfig(text_composition="origin", max_len=20), ENTITY_WORDS)
    batch = collator.mask([(long_text, None), ("Mild edema.", None)], np.random.default_rng(0))
    assert batch.input_ids.shape == (2, 20) and batch.as_tensors()["input_ids"].shape == (2, 20)
    full = [tokenizer.token_to_id("[CLS]")] + tokenizer.encode(long_text).ids
    assert batch.token_ids[0].tolist() == full[:20]
    assert batch.attention_mask[0].sum() == 20
    assert batch.attention_mask[1].sum() == 1 + len(tokenizer.encode("Mild edema.").ids)
    # A word cut by truncation is judged whole: "effusional" cut after "effusion" is no entity, so "no" is
    # no descriptor; "effusions" cut the same way is one ("effusions" is a Table 1 form).
    hand = TextCollator(
        hand_tokenizer(), TextMaskingConfig(text_composition="origin", max_len=3, mask_rate=0.0), ENTITY_WORDS
    )
    cut = hand.mask(
        [("no effusional", None), ("no effusions", None), ("no effusion", None)], np.random.default_rng(0)
    )
    assert cut.token_ids.tolist() == [[2, 5, 6], [2, 5, 6], [2, 5, 6]]
    assert cut.masked[:, 1].tolist() == [False, True, True]
    assert cut.entity[:, 2].tolist() == [False, True, True]


def test_official_quirk_all_positions(tokenizer):
    quirks = OfficialQuirks(mlm_on_all_positions=True)
    batch = make(tokenizer, official_quirks=quirks).mask(
        [(t, None) for t in HANDWRITTEN], np.random.default_rng(0)
    )
    assert (batch.labels == batch.token_ids).all()  # [CLS] and [PAD] included, as in the official loss
    out = batch.as_tensors()
    assert torch.equal(out["labels"][:, : batch.token_ids.shape[1]], torch.from_numpy(batch.token_ids))
    assert (out["labels"][:, batch.token_ids.shape[1] :] == 0).all() and batch.token_ids.shape[1] < 64
    assert (out["weights"][:, batch.token_ids.shape[1] :] == 1.0).all()
    assert (batch.weights[~batch.descriptor] == 1.0).all()
    d = batch.descriptor
    assert np.allclose((batch.weights * d).sum(1), d.sum(1))  # Eq. 3 now over all descriptor pieces


def test_official_quirk_descriptor_masking_rates(tokenizer):
    """Official `_context_mask`: no forced descriptors; entity words at 0.75, others 0.70 (0.75 without
    entity)."""
    quirks = OfficialQuirks(official_descriptor_masking=True)
    collator = make(tokenizer, official_quirks=quirks)
    texts = [("There is no pleural effusion. Mild bibasilar atelectasis.", None)] * 2000
    texts += [("Heart size normal, lungs clear.", None)] * 1000
    batch = collator.mask(texts, np.random.default_rng(0))
    starts = np.array([[p[0] for _, p in words_of(tokenizer, batch, r)] for r in (0,)])[0]
    words = [w for w, _ in words_of(tokenizer, batch, 0)]
    rate = batch.masked[:2000][:, starts].mean(axis=0)
    entity_cols = [i for i, w in enumerate(words) if w in ("effusion", "atelectasis")]
    descriptor_cols = [i for i, w in enumerate(words) if w in ("no", "pleural", "mild", "bibasilar")]
    assert np.all(np.abs(rate[entity_cols] - 0.75) < 0.035)
    assert np.all(np.abs(rate[descriptor_cols] - 0.70) < 0.035)  # not forced
    no_entity = batch.masked[2000:, 1].mean()
    assert abs(no_entity - 0.75) < 0.04
    # The paper's mode forces the same descriptors.
    paper = make(tokenizer).mask(texts[:200], np.random.default_rng(0))
    assert paper.masked[:, starts[descriptor_cols]].all()


def test_ablation_switches(tokenizer):
    pairs = [(t, None) for t in HANDWRITTEN]
    no_dm = make(tokenizer, mask_rate=0.0, descriptor_masking=False).mask(pairs, np.random.default_rng(0))
    assert not no_dm.masked.any() and (no_dm.labels == IGNORE_INDEX).all()
    no_rf = make(tokenizer, rebalance=False).mask(pairs, np.random.default_rng(0))
    assert (no_rf.weights == no_rf.masked).all()


def test_weighted_mlm_loss_normalisation():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 7)
    labels = torch.tensor([[1, IGNORE_INDEX, 3], [IGNORE_INDEX, IGNORE_INDEX, 6]])
    weights = torch.tensor([[0.05, 0.0, 2.0], [0.0, 0.0, 1.0]])
    ce = F.cross_entropy(logits.view(-1, 7), labels.view(-1).clamp(min=0), reduction="none").view(2, 3)
    expected = (0.05 * ce[0, 0] + 2.0 * ce[0, 2] + ce[1, 2]) / 6  # divided by B·L, not by the label count
    assert weighted_mlm_loss(logits, labels, weights).item() == pytest.approx(expected.item(), rel=1e-6)
    perfect = torch.full((1, 2, 4), -30.0)
    perfect[0, 0, 2] = perfect[0, 1, 1] = 30.0
    assert weighted_mlm_loss(perfect, torch.tensor([[2, 1]]), torch.ones(1, 2)).item() < 1e-6
    with pytest.raises(ValueError, match=r"expected logits \[B, L, V\].*labels \(2, 2\)"):
        weighted_mlm_loss(logits, labels[:, :2], weights)


def test_cached_encoder_matches_tokenizer(tokenizer):
    texts = iu_xray_texts()[:400] + ["Café [MASK] x-ray 2.5cm ABC_12 ... ", "", "   ", "a\tb\nc  ;;"]
    encoder = CachedEncoder(tokenizer)
    ids = padded_rows(
        *encoder.encode_flat(texts), width=300, prefix=[2], pad_id=tokenizer.token_to_id("[PAD]")
    )
    for row, text in enumerate(texts):
        expected = [2] + tokenizer.encode(text, add_special_tokens=False).ids[:299]
        assert ids[row, : len(expected)].tolist() == expected
        assert (ids[row, len(expected) :] == 0).all()


def test_vectorised_equals_per_token_reference_loop(tokenizer):
    spec = importlib.util.spec_from_file_location("bench_collate", REPO_ROOT / "bench" / "collate.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    pairs = bench.iu_xray_pairs(ENTITY_WORDS)[:96]
    for cfg in [
        TextMaskingConfig(max_len=48, negative_scope="cue"),
        TextMaskingConfig(max_len=200, beta=3, negative_scope="cue"),
        TextMaskingConfig(
            max_len=64, negative_scope="cue", official_quirks=OfficialQuirks(official_descriptor_masking=True)
        ),
        TextMaskingConfig(
            max_len=64, negative_scope="cue", official_quirks=OfficialQuirks(mlm_on_all_positions=True)
        ),
    ]:  # the reference loop implements the official cue scope
        fast = TextCollator(tokenizer, cfg, ENTITY_WORDS)
        loop = bench.LoopCollator(tokenizer, cfg, ENTITY_WORDS)
        assert bench.same_output(fast(pairs, np.random.default_rng(4)), loop(pairs, np.random.default_rng(4)))


def test_segment_cache_is_transparent(tokenizer):
    """Cached analyses (and a cache that overflows and restarts) give the same batches as fresh ones."""
    pairs = [(t, "There may be mild edema.") for t in HANDWRITTEN] + [(HANDWRITTEN[0], None)]
    cfg = TextMaskingConfig(max_len=48)
    tiny = TextCollator(tokenizer, cfg, ENTITY_WORDS, max_segments=4)
    warm = TextCollator(tokenizer, cfg, ENTITY_WORDS)
    for seed in range(3):
        fresh = TextCollator(tokenizer, cfg, ENTITY_WORDS)(pairs, np.random.default_rng(seed))
        for collator in (tiny, warm):
            out = collator(pairs, np.random.default_rng(seed))
            assert all(torch.equal(out[k], fresh[k]) for k in out)
    assert len(warm.store) == 1 + len(HANDWRITTEN) + 2  # the "." segment, 6 originals, distilled and ""
    with pytest.raises(ValueError, match="empty batch"):
        warm([], np.random.default_rng(0))
