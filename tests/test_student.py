"""The LoRA student: Vicuna template, answer-only labels, LoRA-only training, adapter round trip,
generation."""

from __future__ import annotations

import json
import logging
import stat
import sys

import pytest
import torch

from models.distill import parse
from models.distill.agreement import StudentTooWeakError, agreement, all_absent_answer, check_student
from models.distill.examples import entity_subset_rows, split_held_out
from models.distill.generate import (
    GenerationSettings,
    OpenAIBackend,
    TransformersBackend,
    VllmSettings,
    start_vllm_server,
    vllm_command,
)
from models.distill.prompt import build_messages
from models.distill.student import (
    IGNORE_INDEX,
    AdapterLoadError,
    LoraSettings,
    TinyDims,
    TrainSettings,
    WarmupSettings,
    attach_lora,
    build_tiny_base,
    encode_example,
    encode_prompt,
    load_base,
    load_student,
    save_adapter,
    student_prompt,
    train_student,
    vicuna_prompt,
    warm_up_base,
)
from models.distill.teacher_http import ClientConfig
from models.resources import CONFIG_DIR
from tasks.config import load_config
from tests.fake_openai_server import FakeOpenAIServer

torch.set_num_threads(1)

REPORTS = [
    (
        "Small left pleural effusion. No pneumothorax.",
        ["effusion", "pneumothorax"],
        "There is small left pleural effusion.\nThere is no pneumothorax.",
    ),
    (
        "No focal consolidation. Mild cardiomegaly.",
        ["consolidation", "cardiomegaly"],
        "There is no focal consolidation.\nThere is mild cardiomegaly.",
    ),
    (
        "Possible right lower lobe pneumonia. No effusion.",
        ["pneumonia", "effusion"],
        "There may be right lower lobe pneumonia.\nThere is no effusion.",
    ),
    (
        "Moderate pulmonary edema. No pneumothorax.",
        ["edema", "pneumothorax"],
        "There is moderate pulmonary edema.\nThere is no pneumothorax.",
    ),
]
DIMS = TinyDims(
    vocab_size=400, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4
)
LORA = LoraSettings(r=8, alpha=16, dropout=0.0)
MAX_PROMPT = 96


def prompts() -> list[str]:
    return [vicuna_prompt(build_messages(report, entities)) for report, entities, _ in REPORTS]


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    texts = prompts() + [a for *_, a in REPORTS]
    return build_tiny_base(texts, DIMS, tmp_path_factory.mktemp("base"), seed=0, max_positions=1024)


@pytest.fixture(scope="module")
def trained(base_dir, tmp_path_factory):
    """A student trained for a few steps on the four examples, and its saved adapter."""
    model, tok = load_base(base_dir)
    examples = [
        encode_example(tok, str(i), p, a, 256, MAX_PROMPT)
        for i, (p, (*_, a)) in enumerate(zip(prompts(), REPORTS, strict=True))
    ]
    student = attach_lora(model, LORA, seed=0)
    result = train_student(
        student, examples, TrainSettings(lr=2e-2, epochs=16, batch_size=2, grad_accum=1), tok.pad_token_id
    )
    adapter = save_adapter(student, tok, tmp_path_factory.mktemp("adapter"))
    return student, tok, result, adapter


def test_vicuna_prompt_follows_the_v1_1_template():
    p = vicuna_prompt(build_messages("No effusion.", ["effusion"]))
    assert p.startswith("You are a knowledgeable and veteran doctor. USER: Please help me analysis")
    assert p.endswith("Given the report: No effusion.\nEntities: effusion.\nConclusion: ASSISTANT:")
    assert "<s>" not in p
    with pytest.raises(ValueError, match="unsupported message roles \\['assistant'\\]"):
        vicuna_prompt([{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}])


def test_labels_cover_only_the_answer_tokens(base_dir):
    _, tok = load_base(base_dir)
    prompt, answer = prompts()[0], REPORTS[0][2]
    ex = encode_example(tok, "s1", prompt, answer, max_len=4096, max_prompt=4096)
    prompt_ids = tok(prompt)["input_ids"]
    assert prompt_ids[0] == tok.bos_token_id
    n = len(prompt_ids)
    assert ex.input_ids[:n] == prompt_ids
    assert ex.labels[:n] == [IGNORE_INDEX] * n
    assert ex.labels[n:] == ex.input_ids[n:]
    assert ex.labels[-1] == tok.eos_token_id
    assert tok.decode(ex.labels[n:]) == " " + answer + "</s>"
    # The boundary "ASSISTANT:" | " There" tokenises the same alone and concatenated.
    assert tok(prompt + " " + answer)["input_ids"] == ex.input_ids[:-1]


def test_long_prompts_are_cut_from_the_left_keeping_bos_and_the_report(base_dir):
    _, tok = load_base(base_dir)
    prompt = prompts()[0]
    ids = encode_prompt(tok, prompt, 40)
    full = tok(prompt)["input_ids"]
    assert len(full) > 40 and len(ids) == 40
    assert ids[0] == tok.bos_token_id and ids[1:] == full[-39:]
    assert tok.decode(ids[1:]).endswith("Entities: effusion, pneumothorax.\nConclusion: ASSISTANT:")
    with pytest.raises(ValueError, match="example s9: answer of \\d+ tokens does not fit max_len=8"):
        encode_example(tok, "s9", prompt, REPORTS[0][2], max_len=8, max_prompt=8)


def test_lora_trains_only_adapter_parameters(base_dir):
    model, tok = load_base(base_dir)
    student = attach_lora(model, LORA, seed=0)
    trainable = [n for n, p in student.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert any("q_proj.lora_A" in n for n in trainable) and any("down_proj.lora_B" in n for n in trainable)
    before = {n: p.detach().clone() for n, p in student.named_parameters()}
    ex = [encode_example(tok, "a", prompts()[0], REPORTS[0][2], 256, MAX_PROMPT)]
    train_student(student, ex, TrainSettings(lr=1e-2, epochs=2, batch_size=1, grad_accum=1), tok.pad_token_id)
    changed = {n for n, p in student.named_parameters() if not torch.equal(p, before[n])}
    assert changed and changed <= set(trainable)
    assert any("lora_B" in n for n in changed)  # B starts at zero: it moved, so the adapter is live


def test_loss_falls_on_a_tiny_run(trained):
    _, _, result, _ = trained
    losses = [p.loss for p in result.curve]
    assert len(losses) == result.steps == 32
    assert losses[-1] < 0.5 * losses[0]
    assert result.trainable_params < result.total_params


def report_lm_loss(base_dir) -> float:
    model, tok = load_base(base_dir)
    batch = tok([r for r, *_ in REPORTS], return_tensors="pt", padding=True)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, IGNORE_INDEX)
    with torch.no_grad():
        return float(model(**batch, labels=labels).loss)


def test_warm_up_trains_the_whole_base_on_reports_and_saves_it(tmp_path):
    base = build_tiny_base(
        [r for r, *_ in REPORTS] + prompts(), DIMS, tmp_path / "base", seed=0, max_positions=1024
    )
    before = report_lm_loss(base)
    result = warm_up_base(
        base, [r for r, *_ in REPORTS], WarmupSettings(epochs=30, lr=1e-2, batch_size=4), max_len=128
    )
    assert result.trainable_params == result.total_params  # every weight trains, not an adapter
    after = report_lm_loss(base)  # reloaded from disk: the warmed weights were saved into the base dir
    assert after < 0.5 * before, (before, after)
    with pytest.raises(ValueError, match="no report texts"):
        warm_up_base(base, [], WarmupSettings(epochs=1), max_len=128)


def test_adapter_round_trip_gives_identical_generations(trained, base_dir):
    student, tok, _, adapter = trained
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in adapter.iterdir()}
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    assert cfg["r"] == 8 and cfg["bias"] == "none" and not cfg.get("modules_to_save")  # vLLM-servable
    settings = GenerationSettings(batch_size=4, max_new_tokens=24, max_prompt=MAX_PROMPT)
    expected = TransformersBackend(student, tok, settings).generate(prompts())
    loaded, tok2 = load_student(base_dir, adapter)
    assert TransformersBackend(loaded, tok2, settings).generate(prompts()) == expected
    assert any("There is" in e for e in expected), expected  # it picked up the answer format's words


def test_batched_generation_equals_one_at_a_time(trained):
    student, tok, _, _ = trained
    ps = prompts() + [vicuna_prompt(build_messages("No effusion.", ["effusion"]))]
    batched = TransformersBackend(
        student, tok, GenerationSettings(batch_size=4, max_new_tokens=20, max_prompt=MAX_PROMPT)
    ).generate(ps)
    single = TransformersBackend(
        student, tok, GenerationSettings(batch_size=1, max_new_tokens=20, max_prompt=MAX_PROMPT)
    ).generate(ps)
    assert batched == single and len(batched) == 5


def test_answer_logprobs_is_the_sum_of_the_answer_token_logprobs(trained):
    student, tok, _, _ = trained
    backend = TransformersBackend(
        student, tok, GenerationSettings(batch_size=1, max_new_tokens=20, max_prompt=MAX_PROMPT)
    )
    prompt = prompts()[0]
    answers = [
        "There is no pneumothorax.",
        "There is small left pleural effusion.\nThere is pneumothorax.",
        "x",
    ]
    scores = backend.answer_logprobs(prompt, answers)  # chunks of 2: padding must not change any score
    for answer, score in zip(answers, scores, strict=True):
        p_ids = encode_prompt(tok, prompt, MAX_PROMPT)
        a_ids = tok(" " + answer, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logp = student(input_ids=torch.tensor([p_ids + a_ids])).logits[0].log_softmax(-1)
        expected = sum(float(logp[len(p_ids) + j - 1, t]) for j, t in enumerate(a_ids))
        assert score == pytest.approx(expected, abs=1e-4)
    assert all(s < 0 for s in scores)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("remove_dir", "directory does not exist"),
        ("remove_weights", "missing file\\(s\\) adapter_model.safetensors"),
        ("truncate_weights", "adapter_model.safetensors is corrupt"),
        ("bad_json", "adapter_config.json is not valid JSON"),
    ],
)
def test_corrupt_adapter_dir_gives_a_clear_error(trained, base_dir, tmp_path, damage, message):
    _, tok, _, adapter = trained
    bad = tmp_path / "adapter"
    bad.mkdir()
    for f in adapter.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    weights = bad / "adapter_model.safetensors"
    if damage == "remove_dir":
        bad = tmp_path / "nope"
    elif damage == "remove_weights":
        weights.unlink()
    elif damage == "truncate_weights":
        weights.write_bytes(weights.read_bytes()[:100])
    else:
        (bad / "adapter_config.json").write_text("{not json")
    with pytest.raises(AdapterLoadError, match=f"cannot load LoRA adapter from {bad}: {message}"):
        load_student(base_dir, bad)


def test_agreement_counts_polarity_exact_and_unparseable():
    finder = parse.EntityFinder(["effusion", "pneumonia", "pneumothorax", "edema"])
    requested = [["effusion", "pneumonia"], ["pneumothorax"]]
    teacher = ["There is mild effusion.\nThere may be pneumonia.", "There is no pneumothorax."]
    student = ["There is mild effusion.\nThere is pneumonia.", "There is no pneumothorax.\nEdema is gone"]
    m = agreement(requested, teacher, student, finder)
    assert m["n_entities"] == 3 and m["n_reports"] == 2
    assert m["polarity_acc"] == pytest.approx(2 / 3)
    assert m["exact_sentence_rate"] == pytest.approx(2 / 3)
    assert m["unparseable_rate"] == pytest.approx(1 / 4)
    assert m["report_exact"] == pytest.approx(1 / 2)
    base = agreement(requested, teacher, [all_absent_answer(e) for e in requested], finder)
    assert base["polarity_acc"] == pytest.approx(1 / 3) and base["unparseable_rate"] == 0


def test_a_student_below_the_all_absent_baseline_is_warned_about_or_stopped(caplog):
    """Reliability #17d: a student at 0.585 against the baseline's 0.78 distilled the corpus without a
    word."""
    finder = parse.EntityFinder(["effusion", "pneumonia", "pneumothorax", "edema"])
    requested = [["effusion", "pneumonia", "pneumothorax", "edema"]] * 2
    teacher = [
        "There is no effusion.\nThere is no pneumonia.\nThere is no pneumothorax.\nThere is edema."
    ] * 2
    weak = ["There is effusion.\nThere is no pneumonia.\nThere is pneumothorax.\nThere is edema."] * 2
    evals = [
        {"system": "student", **agreement(requested, teacher, weak, finder)},
        {
            "system": "all_absent",
            **agreement(requested, teacher, [all_absent_answer(e) for e in requested], finder),
        },
    ]
    log = logging.getLogger("test.finetune_student")
    with caplog.at_level(logging.INFO, logger=log.name):
        check_student(evals, None, log)
    assert [(r.levelname, r.getMessage()) for r in caplog.records] == [
        ("INFO", "held-out polarity agreement: student 0.500, all-absent baseline 0.750 (8 entities)"),
        (
            "WARNING",
            "the student's held-out polarity agreement 0.500 is below the all-absent baseline 0.750 (8 "
            "entities): answering every entity 'absent' would do better, and bulk_distill will distil the "
            "corpus with this student; set finetune_student.min_agreement to stop here",
        ),
    ]
    with pytest.raises(StudentTooWeakError) as err:
        check_student(evals, 0.6, log)
    assert str(err.value) == (
        "finetune_student: the student's held-out polarity agreement 0.500 is below "
        "finetune_student.min_agreement 0.6 (all-absent baseline 0.750, 8 entities): the stage fails so that "
        "bulk_distill does not use this student; its outputs are in finetune_student/.attempt/"
    )
    caplog.clear()
    good = {"system": "student", **agreement(requested, teacher, teacher, finder)}
    with caplog.at_level(logging.INFO, logger=log.name):
        check_student([good, evals[1]], 0.6, log)
    assert [r.levelname for r in caplog.records] == ["INFO"]
    config = load_config(CONFIG_DIR / "demo.yaml", ["finetune_student.min_agreement=0.8"])
    assert config.finetune_student.min_agreement == 0.8


def test_held_out_split_is_seeded_and_disjoint():
    ids = [f"s{i}" for i in range(40)]
    train, held = split_held_out(ids, 0.25, seed=3)
    assert len(held) == 10 and not train & held and train | held == set(ids)
    assert split_held_out(ids, 0.25, seed=3) == (train, held)
    assert split_held_out(ids, 0.25, seed=4)[1] != held
    with pytest.raises(ValueError, match="need at least 2 seed distillations"):
        split_held_out(["only"], 0.5, 0)


def test_entity_subset_rows_ask_for_a_subset_and_cut_the_answer_to_it():
    finder = parse.EntityFinder(
        ["effusion", "pneumothorax", "edema", "cardiomediastinal", "contour", "nodule"]
    )
    answer = (
        "There is small left pleural effusion.\nThere is no pneumothorax.\nThere is normal cardiomediastinal "
        "contours.\nThere is no pulmonary edema."
    )
    invented = "There is no pulmonary nodule."  # an entity the list never asked for: no subset may carry it
    row = {
        "study_id": "s1",
        "report": "REPORT",
        "answer": answer + "\n" + invented,
        "prompt": "P",
        "entities": ["effusion", "pneumothorax", "cardiomediastinal", "contour", "edema"],
    }
    single = {
        "study_id": "s2",
        "report": "R2",
        "answer": "There is no edema.",
        "prompt": "P",
        "entities": ["edema"],
    }
    out = entity_subset_rows([row, single], 3, finder, seed=0)
    assert [r["study_id"] for r in out] == [
        "s1#subset0",
        "s1#subset1",
        "s1#subset2",
    ]  # one sentence: no subset
    lines = answer.splitlines()
    for r in out:
        kept = r["answer"].splitlines()
        assert 1 <= len(kept) < len(lines) and kept == [
            x for x in lines if x in kept
        ]  # a proper subset, in order
        named = {e for x in kept for e in finder.find(x)}
        assert r["entities"] == [e for e in row["entities"] if e in named]
        assert r["prompt"] == student_prompt("REPORT", r["entities"])
    assert out == entity_subset_rows([row, single], 3, finder, seed=0)  # seeded
    assert entity_subset_rows([row], 0, finder, seed=0) == []


def test_openai_backend_uses_raw_completions_in_prompt_order():
    with FakeOpenAIServer() as server:
        cfg = ClientConfig(
            base_url=server.base_url,
            model="student",
            api_key_env="ECAMP_TEST_NO_KEY",
            rpm=None,
            tpm=None,
            max_retries=1,
        )
        out = OpenAIBackend(cfg).generate(prompts()[:3])
        assert server.counts["POST /v1/completions"] == 3 and server.counts["POST /v1/chat/completions"] == 0
    assert out[0] == "There is small left pleural effusion.\nThere is no pneumothorax."
    assert out[2].startswith("There may be")


def fake_vllm(tmp_path, body: str):
    """A stand-in for the serving environment's python (error paths and the handshake only; the real server is
    tests/test_vllm_real.py)."""
    exe = tmp_path / "python"
    exe.write_text(f"#!{sys.executable}\n{body}\n")
    exe.chmod(exe.stat().st_mode | stat.S_IEXEC)
    return str(exe)


def test_vllm_server_is_started_with_the_adapter_and_health_checked(tmp_path):
    serve = """
import json, sys
from http.server import BaseHTTPRequestHandler, HTTPServer
args = sys.argv[1:]
assert args[:2] == ["-m", "vllm.entrypoints.openai.api_server"] and "--enable-lora" in args
assert args[args.index("--model") + 1] == "/models/vicuna"
import os
assert os.environ["VLLM_CPU_KVCACHE_SPACE"] == "1"
port = int(args[args.index("--port") + 1])
lora = args[args.index("--lora-modules") + 1]
class H(BaseHTTPRequestHandler):
    def log_message(self, *a): pass
    def do_GET(self):
        body = json.dumps({"data": [{"id": "base"}, {"id": lora.split("=")[0]}]}).encode()
        self.send_response(200); self.send_header("Content-Length", str(len(body))); self.end_headers()
        self.wfile.write(body)
HTTPServer(("127.0.0.1", port), H).serve_forever()
"""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    settings = VllmSettings(
        python=fake_vllm(tmp_path, serve),
        port=port,
        startup_timeout_s=30,
        env={"VLLM_CPU_KVCACHE_SPACE": "1"},
    )
    cmd = vllm_command("/models/vicuna", tmp_path / "adapter", settings)
    assert cmd[cmd.index("--lora-modules") + 1] == f"student={tmp_path / 'adapter'}"
    wider = settings.model_copy(update={"extra_args": ["--data-parallel-size", "4"]})
    assert vllm_command("/m", tmp_path / "adapter", wider)[-2:] == ["--data-parallel-size", "4"]
    with start_vllm_server("/models/vicuna", tmp_path / "adapter", settings, tmp_path / "log.txt") as server:
        assert server.base_url == f"http://127.0.0.1:{port}/v1"
        assert server.process.poll() is None
    assert server.process.poll() is not None  # stopped on exit


def test_vllm_server_that_dies_reports_its_log(tmp_path):
    settings = VllmSettings(
        python=fake_vllm(tmp_path, "print('CUDA out of memory'); raise SystemExit(3)"),
        port=1,
        startup_timeout_s=30,
    )
    with pytest.raises(RuntimeError, match="(?s)the vLLM server exited with code 3.*CUDA out of memory"):
        start_vllm_server("/m", tmp_path / "a", settings, tmp_path / "log.txt")


def test_a_missing_serving_environment_names_the_setting_and_the_make_target(tmp_path):
    settings = VllmSettings(python=str(tmp_path / "nowhere" / "python"))
    with pytest.raises(
        FileNotFoundError,
        match=r"bulk_distill.backend.vllm.python: .*nowhere/python does not exist.*make serve-env",
    ):
        start_vllm_server("/m", tmp_path / "a", settings, tmp_path / "log.txt")
    assert not (tmp_path / "log.txt").exists()
