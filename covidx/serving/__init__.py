"""TF Serving export (``python -m covidx.export``)."""
