"""Server side: aggregation strategies and the aggregator actor."""
