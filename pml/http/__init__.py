"""The HTTP/JSON API (``/v1/patient-ml``), shaped like the public Patient ML Service API."""
