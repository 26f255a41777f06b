"""Importing published once-for-all supernets: PyTorch state dicts, specialised ``net.config``s
and ready-to-search workdirs."""
