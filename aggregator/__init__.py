"""aggregator: a Fluentd-compatible log aggregator that batches records into Kinesis Data Firehose."""

__version__ = "0.1.0"
