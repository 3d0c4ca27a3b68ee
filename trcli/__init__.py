"""trcli: Trust Region preference optimization (TR-DPO / TR-IPO / TR-KTO) from the command line."""

__version__ = "0.1.0"
