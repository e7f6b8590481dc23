"""Tables and plots from run outputs: `python -m fl_sim.report DIR [DIR ...]`."""
