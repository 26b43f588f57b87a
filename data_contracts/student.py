"""Row contracts of `finetune_student` (the LoRA student and its check) and `bulk_distill` (T_d for every
report)."""

from __future__ import annotations

from typing import ClassVar, Literal

from data_contracts.base import Row


class StudentModel(Row):
    """Where the trained adapter lives and what it was trained from; its hash makes bulk_distill's cache
    honest."""

    contract: ClassVar[str] = "student_model"
    version: ClassVar[int] = 2
    adapter_dir: str  # relative to the run directory
    base_model: str  # a local HF model directory (the tiny base is saved under the stage folder)
    adapter_sha256: str  # of adapter_model.safetensors
    lora_r: int
    lora_alpha: int
    max_prompt: int  # prompts are cut from the left to this many tokens, at training and generation alike
    max_new_tokens: int
    decoding: Literal["greedy", "entity_complete"]  # how bulk_distill decodes (models/distill/complete.py)
    reprompt_rounds: int  # entity_complete: re-prompts for still-missing entities
    n_train: int
    n_heldout: int
    n_skipped: int  # seed rows not trained on because their answer did not fit max_len


class StudentEval(Row):
    """Entity-level agreement with the teacher on held-out seed reports, for the student and trivial
    baselines.

    `polarity_acc` counts a requested entity right when the system's sentence for it has the teacher's
    certainty (present / absent / uncertain); a missing sentence is wrong. `exact_sentence_rate`: the
    teacher's sentence for the entity is reproduced word for word. `unparseable_rate`: share of the system's
    sentences that are not in the "There is/may ..." format.
    """

    contract: ClassVar[str] = "student_eval"
    version: ClassVar[int] = 2
    # student: decoded as configured (as bulk_distill decodes); student_greedy: plain greedy decoding
    system: Literal["student", "student_greedy", "all_absent"]
    n_reports: int
    n_entities: int
    polarity_acc: float
    exact_sentence_rate: float
    unparseable_rate: float
    coverage: float  # requested entities with a well-formed sentence
    report_exact: float  # reports whose every requested entity has the teacher's certainty
    reports_per_s: float  # generation throughput (0 for baselines)


class StudentLoss(Row):
    """The training curve: one row per optimizer step (mean loss over that step's answer tokens)."""

    contract: ClassVar[str] = "student_loss"
    version: ClassVar[int] = 1
    step: int
    epoch: float
    loss: float
    lr: float
    tokens: int


class DistilledReport(Row):
    """T_d of Eq. 1 for one report: the teacher's answer where it exists, else the student's (or the teacher's
    answer for a student output that failed QC, within the retry budget)."""

    contract: ClassVar[str] = "distilled_reports"
    version: ClassVar[int] = 1
    study_id: str
    distilled_text: str  # well-formed sentences joined by spaces ("" when the report mentions no entity)
    source: Literal["teacher", "student", "teacher_retry", "none"]  # none: no entity, nothing to distil
    model: str
    entities: list[str]  # requested entities, prompt order
    raw_response: str
    flags: list[str]  # QC flags of the kept answer (models/distill/parse.py::qc_flags)
    shard: int
