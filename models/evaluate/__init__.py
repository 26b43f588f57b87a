"""Downstream evaluation: dataset splits (classification, segmentation, detection) and their metrics."""
