"""`galatea bench`: measurements of every layer, above all of them (each scenario may use any
layer it measures; nothing below imports from here)."""
