"""Pure numpy numerics: decompositions and rank rules, tested on arrays alone."""
