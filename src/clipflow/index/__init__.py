"""The index room: a catalogue embedded with a model, kept as an artifact, and searched through a vector store.

- `artifact`: clip-retrieval's layout on disk (img_emb/, text_emb/, metadata/) plus index.json.
- `embed`: every image (and caption) of a source, streamed, in parallel processes, resumable per part.
- `store`: Milvus (Lite or a cluster): one collection per (model version, data version) behind an alias.
- `step`: `clipflow index` and the pipelines' index step: pin the model, embed, publish.
"""
