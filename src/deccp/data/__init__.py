"""Datasets: schema, loaders for every input format, validation, and conversion to TRL formats."""

from deccp.data.load import Bundle, DatasetError, data_dir, filter_prompts, load_bundle, load_prompts
from deccp.data.schema import LABELS, Answer, Prompt

__all__ = ["LABELS", "Answer", "Bundle", "DatasetError", "Prompt", "data_dir", "filter_prompts", "load_bundle",
           "load_prompts"]
