"""Files: uploads, signed downloads, processing and quotas."""
