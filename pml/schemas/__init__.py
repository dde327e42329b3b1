"""Declared models for data that crosses a boundary (configs, FHIR conventions, messages)."""
