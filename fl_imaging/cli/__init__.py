"""The commands: ``fl-imaging`` (:mod:`~fl_imaging.cli.main`), ``fl-imaging-data``
(:mod:`~fl_imaging.cli.data`), ``fl-imaging-predict`` (:mod:`~fl_imaging.cli.predict`),
``fl-imaging-deploy`` (:mod:`~fl_imaging.cli.deploy`), ``fl-imaging-bench``
(:mod:`~fl_imaging.cli.bench`) and ``fl-imaging-audit`` (:mod:`~fl_imaging.cli.audit`). Each
only parses its arguments and calls the library; no module outside this package imports one of
them."""
