"""Data: datalist I/O and validation, patient-level splits, synthetic cohort."""
