"""What a person sees while a run goes: progress lines, the live view, the log files."""
