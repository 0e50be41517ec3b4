"""Reading a samples directory back: records, the analyzer, logit effects, export and reports."""
