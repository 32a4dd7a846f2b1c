"""The proxy pipeline: one module per stage, run in a fixed order by ``gateway.dataplane.proxy``."""
