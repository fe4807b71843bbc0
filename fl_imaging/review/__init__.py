"""What a run leaves for review: results, audit log, site record, report page, tracking."""
