"""Recommender head on the aligned item space."""
