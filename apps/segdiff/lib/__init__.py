"""The ``segdiff`` MONAI Label app's tasks; all model logic lives in ``monai_segdiff``."""
