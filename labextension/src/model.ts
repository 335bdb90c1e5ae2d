/**
 * Pure helpers of the sessions panel: types of the REST API, query strings, formatting.
 *
 * Nothing here touches JupyterLab or the DOM, so vitest covers it directly.
 */

/** A session's lifecycle, as the store records it. */
export type Status = 'running' | 'done' | 'interrupted' | 'failed';

export const STATUSES: Status[] = ['done', 'running', 'interrupted', 'failed'];

/** One row of the list (GET /promptscope/api/sessions). */
export interface ISessionSummary {
  id: string;
  name: string;
  kind: string;
  model: string;
  status: Status;
  created: number;
  updated: number;
  n_rows: number;
}

/** A page of the list, with the filter choices and the store's state. */
export interface ISessionPage {
  sessions: ISessionSummary[];
  total: number;
  limit: number;
  offset: number;
  /** The most sessions the server lists at once. */
  max_limit: number;
  kinds: string[];
  models: string[];
  store: string;
  /** Why the store cannot be read; empty when it can (or does not exist yet). */
  error: string;
}

export interface ITableJSON {
  columns: string[];
  rows: unknown[][];
  total: number;
}

/** One session (GET /promptscope/api/sessions/<id>). */
export interface ISessionDetail extends ISessionSummary {
  params: Record<string, unknown>;
  model_info: Record<string, unknown>;
  summary: Record<string, unknown>;
  source: string;
  error: string;
  tables: string[];
  figures: string[];
  summary_table: ITableJSON | null;
  summary_error: string;
}

/** What the list is filtered by. */
export interface IFilters {
  search: string;
  kind: string;
  model: string;
  status: string;
}

export const NO_FILTERS: IFilters = { search: '', kind: '', model: '', status: '' };

// The same alphabet the server accepts. Ids go into a notebook cell, so anything else is refused
// rather than quoted.
const ID_RE = /^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$/;

/** Whether `id` is a well-formed session id. */
export function isValidId(id: string): boolean {
  return ID_RE.test(id) && !id.includes('..');
}

/** The code of the cell that "Insert in notebook" adds. */
export function loadCellSource(id: string): string {
  if (!isValidId(id)) {
    throw new Error(`Not a session id: ${JSON.stringify(id)}`);
  }
  return `import promptscope\n\npromptscope.load("${id}")`;
}

/** The query string of a list request (empty filters left out). */
export function listQuery(filters: IFilters, limit: number, offset = 0): string {
  const params = new URLSearchParams();
  const search = filters.search.trim();
  if (search) {
    params.set('search', search);
  }
  for (const key of ['kind', 'model', 'status'] as const) {
    if (filters[key]) {
      params.set(key, filters[key]);
    }
  }
  params.set('limit', String(limit));
  params.set('offset', String(offset));
  return params.toString();
}

/** Whether any filter is set. */
export function hasFilters(filters: IFilters): boolean {
  return Boolean(filters.search.trim() || filters.kind || filters.model || filters.status);
}

/** "just now", "5 min ago", "3 h ago", "yesterday", "4 days ago", then a date. */
export function relativeTime(seconds: number, now: number = Date.now() / 1000): string {
  const ago = Math.max(0, now - seconds);
  if (ago < 45) {
    return 'just now';
  }
  if (ago < 3600) {
    return `${Math.max(1, Math.round(ago / 60))} min ago`;
  }
  if (ago < 86400) {
    return `${Math.round(ago / 3600)} h ago`;
  }
  const days = Math.floor(ago / 86400);
  if (days === 1) {
    return 'yesterday';
  }
  if (days < 7) {
    return `${days} days ago`;
  }
  return new Date(seconds * 1000).toISOString().slice(0, 10);
}

/** A full local timestamp for tooltips and the detail view. */
export function absoluteTime(seconds: number): string {
  const d = new Date(seconds * 1000);
  const pad = (n: number) => String(n).padStart(2, '0');
  return (
    `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())} ` +
    `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`
  );
}

/** A table cell as text: numbers to 4 significant digits, lists and objects as JSON. */
export function formatCell(value: unknown): string {
  if (value === null || value === undefined) {
    return '';
  }
  if (typeof value === 'number') {
    if (Number.isInteger(value)) {
      return String(value);
    }
    return Math.abs(value) >= 1e-3 && Math.abs(value) < 1e6
      ? String(Number(value.toPrecision(4)))
      : value.toExponential(3);
  }
  if (typeof value === 'string') {
    return value;
  }
  return JSON.stringify(value);
}

/** "1 session" / "12 sessions" / "12 of 40 sessions". */
export function countLabel(shown: number, total: number, capped = false): string {
  const noun = total === 1 ? 'session' : 'sessions';
  const count = shown < total ? `${shown} of ${total} ${noun}` : `${total} ${noun}`;
  return capped ? `${count}; search or filter to reach older ones` : count;
}

/** Whether "Show more" can add sessions (the server lists at most `max_limit` at once). */
export function canShowMore(page: ISessionPage): boolean {
  return page.sessions.length < page.total && page.sessions.length < page.max_limit;
}

/** Colors of the current JupyterLab theme that a plotly figure should follow. */
export interface IThemeColors {
  font: string;
  grid: string;
  fontFamily: string;
}

/**
 * A figure's layout adapted to the panel: transparent background, the theme's font and grid
 * colors (so a figure saved in the light theme stays readable in the dark one), the panel's
 * width, and a fixed height (an autosized plot would take the height of its empty container).
 * In a narrow panel the legend goes above the plot and the title shrinks.
 */
export function themedLayout(
  layout: Record<string, any> | undefined,
  colors: IThemeColors,
  width = 800
): Record<string, any> {
  const out: Record<string, any> = { ...(layout ?? {}) };
  const narrow = width < 480;
  out.paper_bgcolor = 'rgba(0,0,0,0)';
  out.plot_bgcolor = 'rgba(0,0,0,0)';
  out.font = { ...(out.font ?? {}), color: colors.font, family: colors.fontFamily };
  for (const axis of ['xaxis', 'yaxis']) {
    out[axis] = { ...(out[axis] ?? {}), gridcolor: colors.grid, zerolinecolor: colors.grid };
  }
  delete out.width;
  out.autosize = true;
  out.height = Math.min(Number(out.height) || (narrow ? 300 : 380), 900);
  out.margin = narrow ? { l: 40, r: 8, t: 64, b: 8 } : { l: 56, r: 16, t: 56, b: 48 };
  out.xaxis.automargin = true;
  out.yaxis.automargin = true;
  if (narrow) {
    // Above the plot: below it, the legend would sit on long rotated tick labels.
    out.legend = { ...(out.legend ?? {}), orientation: 'h', x: 0, y: 1, yanchor: 'bottom' };
    if (out.title) {
      const title = typeof out.title === 'string' ? { text: out.title } : { ...out.title };
      title.font = { ...(title.font ?? {}), size: 12 };
      title.x = 0;
      title.xanchor = 'left';
      title.y = 0.98;
      title.yanchor = 'top';
      out.title = title;
    }
  }
  return out;
}
