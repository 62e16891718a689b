"""Drip: dockerized retraining and inference pipeline for object detection."""

__version__ = "0.1.0"
