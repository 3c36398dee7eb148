"""Watched folders (CONTRACT §7): files dropped into ``folders.inbox`` become items on
``enrich.in.<handler>`` (same routing, batching and durability as NATS items), and their
results come back as ``outbox/<handler>/<name>.results.jsonl``.

The life of one file (docs/folders.md has the crash analysis), and the module of each step:

1. *settle* (:mod:`.watch`, :class:`~.watch.InboxWatcher`): watchfiles or a scan reports
   it; it is taken once unchanged for ``folders.settle_s`` (a file that is already older
   is taken at once).
2. *claim* (:mod:`.claim`): refused (→ ``inbox/.failed/``, :mod:`.refuse`) if any part of
   its path is a symlink, it is not a regular file, too large, empty, or its subfolder is
   no handler; else its state is saved and it is renamed into
   ``inbox/.processing/<key>/``, out of everyone's way.
3. *read* (:mod:`.read`, in a thread): items validated into a manifest, bad records
   spooled as error events.
4. *publish* (:mod:`.publish`): items to intake with ``Nats-Msg-Id: <key>:<n>``;
   ``accepted`` once all acked.
5. *collect* (:mod:`.results`, :class:`~.results.ResultCollector`): a durable pull
   consumer on ``<prefix>.out.>`` spools each awaited result (fsync, then ack).
6. *finish*: the source to ``inbox/.done/``, the results file in input order (atomic),
   ``enrich.events.file.done``.

:mod:`.source` (:class:`~.source.FolderSource`) runs the steps on the workers of
:mod:`.work`; :mod:`.recovery` reads back at start what was in flight. Every step that
fails is retried with a backoff and a bounded number of attempts (:mod:`.retry`:
``TEMPORARY_ATTEMPTS`` for a disk full or an I/O error, ``OTHER_ATTEMPTS`` otherwise);
then the file goes to ``inbox/.failed/`` with a reason, so every dropped file ends in
results or in ``.failed/`` in bounded time. The per-file state on disk is
:mod:`service.state.folder_files`, its names and modes :mod:`service.state.safe_paths`;
the file formats are :mod:`service.core.formats` (pure).
"""
