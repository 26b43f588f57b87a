"""ECAMP itself (paper §3.2-3.3): the model, the pre-training engine and the timm-loadable export."""
