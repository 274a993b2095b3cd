"""pipeline: multi-task 3D tumour segmentation + genetic-marker classification on MONAI."""

__version__ = "0.1.0"
