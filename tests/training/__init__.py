"""Retraining the shipped models from their cards' commands."""
