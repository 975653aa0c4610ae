"""Streamlit dashboard over the results store (read-only)."""
