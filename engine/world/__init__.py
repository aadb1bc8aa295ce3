"""mmfuse.world: a procedurally generated visual world (coloured shapes on a 2 x 2 grid) with
captions, questions and answers, an exact parser from pixels, metrics, and the small models mmfuse
trains on it and ships (`mmfuse world train`, `mmfuse demo`)."""
