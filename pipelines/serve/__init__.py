"""The Serve application, the batch evaluation driver that feeds it, and the report it writes."""
