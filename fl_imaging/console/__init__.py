"""What a person sees while a run goes: progress lines, the live view, the log files.

- :mod:`.events`: the progress events (messages out, replies in, epochs, rounds) carried by
  log records;
- :mod:`.site_lines`: the sites' records from Ray's workers, through a folder of the run;
- :mod:`.record_lines`: a record as one line of JSON (the workers' files, a deployed
  ServerApp's stream); :mod:`.flower_output`: ``flwr run --stream``'s lines;
- :mod:`.run_view` (state) and :mod:`.live_view` (drawing): the live view on a terminal;
- :mod:`.terminal`: what the terminal shows, in which form (``fl-imaging``'s console);
- :mod:`.progress`: stderr lines in a deployed site's ClientApp process.
"""
