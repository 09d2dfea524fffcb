"""Training QuARI hypernetworks over embedding sets (issue 4)."""
