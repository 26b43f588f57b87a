"""GLoRIA (Huang et al., ICCV 2021), re-trained on distilled reports: encoders, word aggregation and losses.

ECAMP (paper §3.3) re-trains GLoRIA on the entity-centred distilled reports and reads its word→region
attention to place the super-resolution window. This module holds the model only; training lives in
`gloria_train.py`, maps and windows in `attention.py`. No Prefect here.

Geometry follows the official code (REFERENCE §1.1-1.3): local features are ResNet-50 `layer3` (19×19 at 299
px), the global feature is `layer4` average-pooled; words are WordPiece tokens summed into whole words (`##`
pieces), summed over the last 4 BERT layers. The local loss uses γ1, γ2, γ3 = 4, 5, 10.
Default attention is the official *double* softmax (first over words per region, then γ1-scaled over regions);
`softmax="single"` is the paper's equation, a_jr = softmax_r(γ1 · v_r·l_j).
Two documented deviations, off by default (the demo turns them on): `scores="cosine"` (L2-normalised features
in the word·region scores) and a local loss restricted to the words of affirmed findings (`local_loss` focus).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Literal, NamedTuple

import timm
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator
from tokenizers import Tokenizer
from tokenizers.implementations import BertWordPieceTokenizer
from torch import nn
from transformers import BertConfig, BertModel

SPECIAL_WORDS = frozenset({"[CLS]", "[SEP]", "[PAD]", "[MASK]"})


TEXT_DIMS = frozenset({"vocab_size", "text_hidden", "text_layers", "text_heads", "text_intermediate"})


class GloriaConfig(BaseModel):
    """Model hyper-parameters; defaults are the paper-scale (official GLoRIA) values.

    The `train_gloria` stage nests this as its `model` section, so each setting is declared here once.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    encoder: Literal["resnet50", "small"] = "resnet50"
    image_size: int = Field(299, ge=32, description="official: 224 crop upsampled to 299 before the ResNet")
    image_checkpoint: str | None = Field(
        None,
        description="ImageNet ResNet-50 weights (a timm/torchvision file) for encoder resnet50; 'random' = "
        "random init (an explicit choice: unset is an error)",
    )
    text_checkpoint: str | None = Field(
        None,
        description="a local Hugging Face BERT folder (official: Bio_ClinicalBERT) whose weights and "
        "vocabulary the text encoder starts from, for encoder resnet50; 'random' = a BERT built from text_* "
        "(unset is an error)",
    )
    small_width: int = Field(32, ge=4, description="channels of the first stage of the small CNN (demo)")
    embed_dim: int = Field(768, ge=8)
    vocab_size: int = Field(
        30000, ge=16, description="WordPiece vocabulary trained on the reports (target size)"
    )
    text_hidden: int = Field(768, ge=8)
    text_layers: int = Field(12, ge=1)
    text_heads: int = Field(12, ge=1)
    text_intermediate: int = Field(3072, ge=8)
    max_tokens: int = Field(97, ge=4, description="official `word_num`: tokens per report")
    last_n_layers: int = Field(4, ge=1, description="BERT layers summed into word features (official 4)")
    temp1: float = 4.0
    temp2: float = 5.0
    temp3: float = 10.0
    softmax: Literal["double", "single"] = Field(
        "double", description="double = official code; single = paper"
    )
    scores: Literal["dot", "cosine"] = Field(
        "dot",
        description="word·region attention scores: dot = official code; cosine = L2-normalised features",
    )
    local_weight: float = Field(1.0, ge=0)
    global_weight: float = Field(1.0, ge=0)

    @model_validator(mode="after")
    def text_dims_come_from_the_checkpoint(self) -> GloriaConfig:
        """With a BERT folder as text_checkpoint, its config.json fixes the text encoder's sizes: a size set
        here to anything but its default would be silently overridden, so it is refused. (Compared with the
        defaults, not with what was set: a config file is merged over every default before it is
        validated.)"""
        if not chosen(self.text_checkpoint):
            return self
        fields = type(self).model_fields
        overridden = sorted(k for k in TEXT_DIMS if getattr(self, k) != fields[k].default)
        if overridden:
            raise ValueError(
                f"{', '.join(overridden)}: set by text_checkpoint's config.json ({self.text_checkpoint}); "
                f"remove them, or set text_checkpoint: random to build the text encoder from them"
            )
        return self


# ------------------------------------------------------------------------------------------------------------
# Initializations: ImageNet ResNet-50 and Bio_ClinicalBERT from local paths, random only when asked
# ------------------------------------------------------------------------------------------------------------

RANDOM_INIT = "random"
RESNET50_URL = "https://download.pytorch.org/models/resnet50-0676ba61.pth (torchvision ImageNet ResNet-50)"
CLINICAL_BERT_URL = (
    "https://huggingface.co/emilyalsentzer/Bio_ClinicalBERT (a folder with config.json, vocab.txt)"
)


def chosen(checkpoint: str | None) -> bool:
    """A weights path was given (not unset, not 'random')."""
    return checkpoint not in (None, RANDOM_INIT)


def is_bert_folder(path: Path) -> bool:
    return (path / "config.json").is_file() and any(
        (path / f).is_file() for f in ("vocab.txt", "tokenizer.json")
    )


def check_initializations(cfg: GloriaConfig, key: str = "train_gloria.model") -> None:
    """Before any training: the paper-scale GLoRIA (encoder resnet50) starts from ImageNet ResNet-50 and
    Bio_ClinicalBERT as the official code does, or from random weights chosen explicitly; the demo's small CNN
    has no published weights to start from."""
    if cfg.encoder != "resnet50":
        return
    unset, missing = [], []  # both weights at once: a user fixes them in one go
    for field, what, url, found in (
        ("image_checkpoint", "ImageNet ResNet-50 weights", RESNET50_URL, Path.is_file),
        ("text_checkpoint", "Bio_ClinicalBERT", CLINICAL_BERT_URL, is_bert_folder),
    ):
        value = getattr(cfg, field)
        how = (
            f"official GLoRIA starts from {what}: download {url} and set {key}.{field}=<its path>, or set "
            f"{key}.{field}={RANDOM_INIT} to train from random weights"
        )
        if value is None:
            unset.append(f"{key}.{field} is not set: {how}")
        elif chosen(value) and not found(Path(value)):
            missing.append(f"{key}.{field} {value} not found: {how}")
    if missing:
        raise FileNotFoundError("\n".join(missing + unset))
    if unset:
        raise ValueError("\n".join(unset))


def load_bert_tokenizer(folder: str | Path) -> Tokenizer:
    """The WordPiece tokenizer of a local BERT folder: its tokenizer.json, else its vocab.txt (lower-cased
    unless its tokenizer_config.json says do_lower_case false)."""
    folder = Path(folder)
    if (folder / "tokenizer.json").is_file():
        return Tokenizer.from_file(str(folder / "tokenizer.json"))
    settings = folder / "tokenizer_config.json"
    lowercase = json.loads(settings.read_text()).get("do_lower_case", True) if settings.is_file() else True
    return BertWordPieceTokenizer(str(folder / "vocab.txt"), lowercase=lowercase)._tokenizer


def bert_dims(folder: str | Path) -> dict[str, int]:
    """The text_* fields of GloriaConfig a BERT folder's config.json fixes (a saved model rebuilds from
    them)."""
    bert = BertConfig.from_pretrained(str(folder))
    return {
        "vocab_size": bert.vocab_size,
        "text_hidden": bert.hidden_size,
        "text_layers": bert.num_hidden_layers,
        "text_heads": bert.num_attention_heads,
        "text_intermediate": bert.intermediate_size,
    }


# ------------------------------------------------------------------------------------------------------------
# Text: report -> words; WordPiece tokens -> whole words
# ------------------------------------------------------------------------------------------------------------


def clean_report(text: str) -> str:
    """GLoRIA's report preprocessing: split sentences on '.' and numbered bullets, keep lower-case ASCII \\w+
    words.

    GLoRIA also drops one-word sentences; we keep them ("Cardiomegaly." names an entity), a deliberate
    deviation.
    """
    sentences = re.split(r"[0-9]+\.|\.", text.replace("\n", " "))
    kept = [" ".join(re.findall(r"\w+", s.lower().encode("ascii", "ignore").decode())) for s in sentences]
    return " ".join(s for s in kept if s)


def group_subwords(tokens: list[str]) -> tuple[list[int], list[str]]:
    """Word index of each token (-1 for special tokens) and the word strings, by GLoRIA's `##` rule.

    A token starting with `##` continues the current word; any other token starts a new one. The walk stops at
    `[SEP]` (everything after it, padding included, gets -1), as GLoRIA's `aggregate_tokens` does.
    """
    index: list[int] = []
    words: list[str] = []
    stopped = False
    for token in tokens:
        if stopped or token in SPECIAL_WORDS:
            stopped = stopped or token == "[SEP]"
            index.append(-1)
        elif token.startswith("##") and words and index and index[-1] == len(words) - 1:
            words[-1] += token[2:]
            index.append(len(words) - 1)
        else:
            words.append(token.removeprefix("##"))
            index.append(len(words) - 1)
    return index, words


class TextBatch(NamedTuple):
    input_ids: torch.Tensor  # [B, T] long
    attention_mask: torch.Tensor  # [B, T] long
    word_index: torch.Tensor  # [B, T] long, -1 = not part of a word
    n_words: torch.Tensor  # [B] long
    words: list[list[str]]

    def to(self, device: torch.device | str) -> TextBatch:
        tensors = [t.to(device) for t in (self.input_ids, self.attention_mask, self.word_index, self.n_words)]
        return TextBatch(*tensors, self.words)


def encode_texts(tokenizer: Tokenizer, texts: list[str], max_tokens: int) -> TextBatch:
    """Tokenize `[CLS] text [SEP]`, truncated to `max_tokens`, padded to the longest, with word grouping."""
    cls_id, sep_id, pad_id = (tokenizer.token_to_id(t) for t in ("[CLS]", "[SEP]", "[PAD]"))
    encodings = tokenizer.encode_batch(texts, add_special_tokens=False)
    rows: list[tuple[list[int], list[str]]] = []
    for enc in encodings:
        ids = [cls_id, *enc.ids[: max_tokens - 2], sep_id]
        tokens = ["[CLS]", *enc.tokens[: max_tokens - 2], "[SEP]"]
        rows.append((ids, tokens))
    length = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    word_index = torch.full((len(rows), length), -1, dtype=torch.long)
    words: list[list[str]] = []
    for i, (ids, tokens) in enumerate(rows):
        index, row_words = group_subwords(tokens)
        input_ids[i, : len(ids)] = torch.tensor(ids)
        word_index[i, : len(ids)] = torch.tensor(index)
        words.append(row_words)
    attention_mask = (input_ids != pad_id).long()
    n_words = torch.tensor([len(w) for w in words], dtype=torch.long)
    return TextBatch(input_ids, attention_mask, word_index, n_words, words)


def aggregate_words(hidden: torch.Tensor, word_index: torch.Tensor, n_max: int) -> torch.Tensor:
    """Sum token features [B, T, H] into word features [B, n_max, H]; tokens with index -1 are dropped."""
    b, _, h = hidden.shape
    index = torch.where(word_index < 0, torch.full_like(word_index, n_max), word_index)
    out = hidden.new_zeros(b, n_max + 1, h)
    out.scatter_add_(1, index.unsqueeze(-1).expand(-1, -1, h), hidden)
    return out[:, :n_max]


class TextEncoder(nn.Module):
    """BERT from a local checkpoint folder (`text_checkpoint`) or built from the config (no download), word
    features and a sentence feature, projected to embed_dim."""

    def __init__(self, cfg: GloriaConfig):
        super().__init__()
        if chosen(cfg.text_checkpoint):
            self.bert = BertModel.from_pretrained(cfg.text_checkpoint, add_pooling_layer=False)
        else:
            bert_cfg = BertConfig(
                vocab_size=cfg.vocab_size,
                hidden_size=cfg.text_hidden,
                num_hidden_layers=cfg.text_layers,
                num_attention_heads=cfg.text_heads,
                intermediate_size=cfg.text_intermediate,
                max_position_embeddings=max(512, cfg.max_tokens),
                pad_token_id=0,
            )
            self.bert = BertModel(bert_cfg, add_pooling_layer=False)
        hidden = self.bert.config.hidden_size
        self.last_n_layers = min(cfg.last_n_layers, self.bert.config.num_hidden_layers)
        self.word_proj = nn.Linear(hidden, cfg.embed_dim)
        self.sentence_proj = nn.Linear(hidden, cfg.embed_dim)

    def forward(self, text: TextBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> words [B, W, D], word_mask [B, W] bool, sentence [B, D]."""
        out = self.bert(
            input_ids=text.input_ids, attention_mask=text.attention_mask, output_hidden_states=True
        )
        hidden = torch.stack(out.hidden_states[-self.last_n_layers :]).sum(0)
        n_max = max(int(text.n_words.max()), 1)
        words = aggregate_words(hidden, text.word_index, n_max)
        word_mask = torch.arange(n_max, device=words.device)[None] < text.n_words[:, None]
        weights = word_mask.to(words.dtype)
        sentence = (words * weights[..., None]).sum(1) / weights.sum(1, keepdim=True).clamp(min=1)
        return self.word_proj(words), word_mask, self.sentence_proj(sentence)


# ------------------------------------------------------------------------------------------------------------
# Image: local region grid + global feature
# ------------------------------------------------------------------------------------------------------------


def conv_bn_relu(c_in: int, c_out: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


class SmallCNN(nn.Module):
    """Demo backbone with ResNet-like strides: local features at stride 8, global at stride 16."""

    def __init__(self, width: int):
        super().__init__()
        self.stem = nn.Sequential(conv_bn_relu(1, width, 2), conv_bn_relu(width, width, 1))
        self.stage_local = nn.Sequential(
            conv_bn_relu(width, 2 * width, 2), conv_bn_relu(2 * width, 4 * width, 2)
        )
        self.stage_global = conv_bn_relu(4 * width, 8 * width, 2)
        self.channels = (4 * width, 8 * width)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        local = self.stage_local(self.stem(x))
        return [local, self.stage_global(local)]


def build_backbone(cfg: GloriaConfig) -> tuple[nn.Module, tuple[int, int]]:
    """ResNet-50 (timm, layer3 + layer4, 1 input channel) or the small demo CNN, with its channel counts."""
    if cfg.encoder == "small":
        net = SmallCNN(cfg.small_width)
        return net, net.channels
    kwargs: dict = {"features_only": True, "out_indices": (3, 4), "in_chans": 1}
    if chosen(cfg.image_checkpoint):  # timm sums the RGB filters of conv1 into the one grey channel
        kwargs |= {"pretrained": True, "pretrained_cfg_overlay": {"file": cfg.image_checkpoint}}
    net = timm.create_model("resnet50", **kwargs)
    local_ch, global_ch = net.feature_info.channels()
    return net, (local_ch, global_ch)


class ImageEncoder(nn.Module):
    """Grayscale image [B, 1, S, S] -> region features [B, D, h, w] and a global feature [B, D]."""

    def __init__(self, cfg: GloriaConfig):
        super().__init__()
        self.backbone, (local_ch, global_ch) = build_backbone(cfg)
        self.local_proj = nn.Conv2d(local_ch, cfg.embed_dim, kernel_size=1, bias=False)
        self.global_proj = nn.Linear(global_ch, cfg.embed_dim)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        local, deep = self.backbone(images)
        return self.local_proj(local), self.global_proj(deep.mean(dim=(2, 3)))


# ------------------------------------------------------------------------------------------------------------
# Attention and losses
# ------------------------------------------------------------------------------------------------------------


def attention_weights(
    scores: torch.Tensor, word_mask: torch.Tensor, gamma1: float, softmax: Literal["double", "single"]
) -> torch.Tensor:
    """Word→region attention [..., W, R] from word·region scores [..., W, R]; each row sums to 1 over R.

    `word_mask` broadcasts to [..., W, 1]. Double softmax (official code): normalise over the caption's words
    for each region first, so γ1 acts on probabilities in [0, 1]; single (paper): softmax_r(γ1 · score).
    """
    if softmax == "double":
        scores = scores.masked_fill(~word_mask, float("-inf")).softmax(dim=-2)
        scores = scores.masked_fill(~word_mask, 0.0)
    elif softmax != "single":
        raise ValueError(f"softmax must be 'double' or 'single', got {softmax!r}")
    return (gamma1 * scores).softmax(dim=-1)


def score_features(
    regions: torch.Tensor, words: torch.Tensor, kind: Literal["dot", "cosine"]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Regions [B, D, R] and words [B', W, D] as the word·region scores use them.

    `dot` (official code) uses raw features, so one region whose feature norm grows (a border "sink" cell of a
    small CNN) takes all of every word's attention; `cosine` L2-normalises both sides first, so γ1 alone sets
    the sharpness and a region wins only by its direction.
    """
    if kind == "cosine":
        return F.normalize(regions, dim=1), F.normalize(words, dim=-1)
    if kind != "dot":
        raise ValueError(f"scores must be 'dot' or 'cosine', got {kind!r}")
    return regions, words


def region_scores(regions: torch.Tensor, words: torch.Tensor, kind: Literal["dot", "cosine"]) -> torch.Tensor:
    """Word·region scores of every caption against every image: [B_img, B_txt, W, R] (see
    `score_features`)."""
    regions, words = score_features(regions, words, kind)
    return torch.einsum("bdr,iwd->biwr", regions, words)


def global_loss(image_g: torch.Tensor, text_g: torch.Tensor, temp3: float) -> torch.Tensor:
    """Symmetric InfoNCE over cosine similarities × temp3 (GLoRIA `global_loss`: g0 + g1)."""
    scores = temp3 * F.normalize(image_g, dim=-1) @ F.normalize(text_g, dim=-1).T
    target = torch.arange(scores.shape[0], device=scores.device)
    return F.cross_entropy(scores, target) + F.cross_entropy(scores.T, target)


def local_similarities(
    regions: torch.Tensor, words: torch.Tensor, word_mask: torch.Tensor, cfg: GloriaConfig
) -> torch.Tensor:
    """[B_img, B_txt] scores γ3·log Σ_j exp(γ2·cos(c_j, l_j)), c_j the attended region context of word j.

    regions [B, D, R], words [B, W, D], word_mask [B, W]. Every caption attends over every image at once.
    """
    scores = region_scores(regions, words, cfg.scores)
    attn = attention_weights(scores, word_mask[None, :, :, None], cfg.temp1, cfg.softmax)
    context = torch.einsum("biwr,bdr->biwd", attn, regions)
    cos = F.cosine_similarity(context, words[None].expand_as(context), dim=-1)
    cos = (cfg.temp2 * cos).masked_fill(~word_mask[None], float("-inf"))
    return cfg.temp3 * cos.logsumexp(dim=-1)


def local_loss(
    regions: torch.Tensor,
    words: torch.Tensor,
    word_mask: torch.Tensor,
    cfg: GloriaConfig,
    focus: torch.Tensor | None = None,
) -> torch.Tensor:
    """GLoRIA local loss, both directions (image→text and text→image), l0 + l1.

    `focus` [B, W] (bool) restricts the captions to the words that name an affirmed finding: only captions
    with at least one such word take part, each against all B images (text→image), and each of their images
    against those captions (image→text). Words of negated or templated sentences ("there is no effusion")
    have no region to point at; with all words, the loss is solved by matching the bulk of the caption to the
    image as a whole, and the few finding words never have to find their lesion.
    """
    if focus is None:
        sims = local_similarities(regions, words, word_mask, cfg)
        target = torch.arange(sims.shape[0], device=sims.device)
        return F.cross_entropy(sims, target) + F.cross_entropy(sims.T, target)
    focus = focus & word_mask
    keep = focus.any(dim=1)
    n = int(keep.sum())
    if n == 0:
        return regions.sum() * 0.0  # nothing affirmed in this batch: no local term, a zero kept in the graph
    sims = local_similarities(regions, words[keep], focus[keep], cfg)  # [B_img, n_txt]
    cols = torch.nonzero(keep).squeeze(1)
    text_to_image = F.cross_entropy(sims.T, cols)
    if n < 2:
        return text_to_image
    image_to_text = F.cross_entropy(sims[cols], torch.arange(n, device=sims.device))
    return text_to_image + image_to_text


class GloriaOutput(NamedTuple):
    regions: torch.Tensor  # [B, D, h, w]
    image_global: torch.Tensor  # [B, D]
    words: torch.Tensor  # [B, W, D]
    word_mask: torch.Tensor  # [B, W]
    text_global: torch.Tensor  # [B, D]


class Gloria(nn.Module):
    """Image and text encoders with GLoRIA's global + local contrastive objectives."""

    def __init__(self, cfg: GloriaConfig):
        super().__init__()
        self.cfg = cfg
        self.image_encoder = ImageEncoder(cfg)
        self.text_encoder = TextEncoder(cfg)

    def forward(self, images: torch.Tensor, text: TextBatch) -> GloriaOutput:
        if int(text.n_words.min()) < 1:
            raise ValueError("every caption needs at least one word (empty report text reached the model)")
        regions, image_global = self.image_encoder(images)
        words, word_mask, text_global = self.text_encoder(text)
        return GloriaOutput(regions, image_global, words, word_mask, text_global)

    def losses(self, out: GloriaOutput, focus: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """{'loss', 'loss_local', 'loss_global'}; loss = w_l·local + w_g·global (both weights 1 officially).

        `focus`: see `local_loss` (None = the official all-word local loss)."""
        regions = out.regions.flatten(2).float()
        loss_local = local_loss(regions, out.words.float(), out.word_mask, self.cfg, focus)
        loss_global = global_loss(out.image_global.float(), out.text_global.float(), self.cfg.temp3)
        loss = self.cfg.local_weight * loss_local + self.cfg.global_weight * loss_global
        return {"loss": loss, "loss_local": loss_local, "loss_global": loss_global}

    def word_attention(self, out: GloriaOutput) -> torch.Tensor:
        """Attention of each word of caption i over the regions of its own image i: [B, W, h, w]."""
        b, _, h, w = out.regions.shape
        regions, words = score_features(out.regions.flatten(2).float(), out.words.float(), self.cfg.scores)
        scores = torch.einsum("bdr,bwd->bwr", regions, words)
        attn = attention_weights(scores, out.word_mask[..., None], self.cfg.temp1, self.cfg.softmax)
        return attn.view(b, -1, h, w)

    def mean_attention(
        self, regions: torch.Tensor, words: torch.Tensor, word_mask: torch.Tensor, chunk: int = 256
    ) -> torch.Tensor:
        """Mean attention of one caption's words [W, D] (mask [W]) over many images' regions [M, D, R]: [W,
        R].

        The caption's own attention prior: where its words look whatever the image (see `extract_attention`).
        """
        total = regions.new_zeros(words.shape[0], regions.shape[-1])
        for start in range(0, regions.shape[0], chunk):
            part = regions[start : start + chunk].float()
            scores = region_scores(part, words[None].float(), self.cfg.scores)[:, 0]  # [m, W, R]
            attn = attention_weights(scores, word_mask[None, :, None], self.cfg.temp1, self.cfg.softmax)
            total += attn.sum(0)
        return total / regions.shape[0]
