"""xray-pipeline: classify, stamp and anonymize every image that lands in an S3 bucket."""

__version__ = "0.1.0"
