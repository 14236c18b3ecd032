"""The lifecycle of a run folder: new, resume and init runs, their stored settings, one writer
at a time, and readers that survive a run saving under them."""
