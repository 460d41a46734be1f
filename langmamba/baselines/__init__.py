"""Baseline denoisers the model card compares LangMamba with."""

from .redcnn import REDCNN

__all__ = ["REDCNN"]
