// What can be chatted with: the store's models and the personas (a persona is served
// under its own name as a model id).

import { api } from "./api";

export interface ModelEntry {
  name: string;
  size: number;
  details: { parameter_size?: string; quantization_level?: string; family?: string; parent_model?: string };
}

export interface PersonaEntry {
  id: string;
  name: string;
  description: string;
  model: string;
  adapter: string | null;
  greeting: string;
  knowledge: { sources: { file: string; title: string; size: number; added_at: string }[]; [key: string]: any };
  [key: string]: any;
}

export async function loadModels(): Promise<ModelEntry[]> {
  const tags = await api<{ models: ModelEntry[] }>("/api/tags");
  return tags.models ?? [];
}

export async function loadPersonas(): Promise<PersonaEntry[]> {
  const data = await api<{ data: PersonaEntry[] }>("/v1/personas");
  return data.data ?? [];
}

export async function loadTargets(): Promise<{ models: ModelEntry[]; personas: PersonaEntry[] }> {
  const [models, personas] = await Promise.all([loadModels(), loadPersonas().catch(() => [] as PersonaEntry[])]);
  return { models, personas };
}
