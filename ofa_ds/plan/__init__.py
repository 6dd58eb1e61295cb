"""Planning a run before it starts: memory per rank and step time of parallel layouts (`ofa-ds plan`)."""
