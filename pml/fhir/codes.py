"""The codes of pml's FHIR conventions (see the README's "FHIR conventions")."""

LABEL_SYSTEM = "urn:pml:label"
LABEL_CODE = "label"  # Observation.code of a classification label
MASK_CODE = "mask"  # DocumentReference.type of a segmentation mask
