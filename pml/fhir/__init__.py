"""FHIR: reading sources, the conventions that turn records into examples, writing bundles."""
