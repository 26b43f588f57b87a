"""Context distillation (paper §3.1): the Table 2 teacher prompt, teachers (offline rules, any
OpenAI-compatible endpoint, the Batch API), the response cache, parsing/QC and seed selection.
The LoRA student lives in `student.py`."""
