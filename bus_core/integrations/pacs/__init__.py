"""The hospital archive (PACS) over DICOMweb."""
