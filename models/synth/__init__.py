"""Deterministic generated demo corpus: chest-radiograph-like images with localised findings, MIMIC-CXR-style
reports describing them, MIMIC-CXR(-JPG) layout and CSVs, and downstream labels (classes, masks, boxes)."""

from models.synth.corpus import CorpusSummary, SynthConfig, generate_corpus

__all__ = ["CorpusSummary", "SynthConfig", "generate_corpus"]
