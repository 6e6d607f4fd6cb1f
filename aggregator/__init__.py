"""aggregator: a Fluentd-compatible log aggregator that batches events into Kinesis Firehose."""

__version__ = "0.1.0"
