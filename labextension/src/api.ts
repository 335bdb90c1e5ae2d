/**
 * Calls to the promptscope server extension, through JupyterLab's ServerConnection so that
 * requests carry the server's token / XSRF cookie like every other Jupyter API call.
 */
import { URLExt } from '@jupyterlab/coreutils';
import { ServerConnection } from '@jupyterlab/services';

import { IFilters, ISessionDetail, ISessionPage, listQuery } from './model';

/** A failed request; `message` is the server's explanation. */
export class ApiError extends Error {
  constructor(
    message: string,
    readonly status: number
  ) {
    super(message);
  }
}

async function request(path: string, init: RequestInit = {}): Promise<Response> {
  const settings = ServerConnection.makeSettings();
  const url = URLExt.join(settings.baseUrl, 'promptscope', 'api', path);
  let response: Response;
  try {
    response = await ServerConnection.makeRequest(url, init, settings);
  } catch (error) {
    throw new ApiError(`The Jupyter server cannot be reached (${String(error)}).`, 0);
  }
  if (!response.ok) {
    let message = response.statusText;
    try {
      const body = await response.json();
      message = body.message || message;
    } catch {
      // not JSON: keep the status text
    }
    if (response.status === 404 && path.split('?')[0] === 'sessions') {
      message =
        'The promptscope server extension is not enabled: run ' +
        '`jupyter server extension enable promptscope.server` and restart JupyterLab.';
    }
    throw new ApiError(message, response.status);
  }
  return response;
}

function sessionPath(id: string, ...rest: string[]): string {
  return ['sessions', encodeURIComponent(id), ...rest.map(encodeURIComponent)].join('/');
}

export async function listSessions(
  filters: IFilters,
  limit: number,
  offset = 0
): Promise<ISessionPage> {
  const response = await request(`sessions?${listQuery(filters, limit, offset)}`);
  return response.json();
}

export async function getSession(id: string): Promise<ISessionDetail> {
  return (await request(sessionPath(id))).json();
}

export async function getFigure(id: string, name: string): Promise<any> {
  return (await request(sessionPath(id, 'figures', name))).json();
}

export async function renameSession(id: string, name: string): Promise<void> {
  await request(sessionPath(id), { method: 'PATCH', body: JSON.stringify({ name }) });
}

export async function deleteSession(id: string): Promise<void> {
  await request(sessionPath(id), { method: 'DELETE' });
}

/** Download an export (`csv` of one table, or the `html` report) as a file. */
export async function downloadExport(
  id: string,
  format: 'csv' | 'html',
  table = 'rows'
): Promise<string> {
  const query = format === 'csv' ? `?table=${encodeURIComponent(table)}` : '';
  const response = await request(sessionPath(id, 'export', format) + query);
  const blob = await response.blob();
  const filename = format === 'csv' ? `${id}-${table}.csv` : `${id}.html`;
  const url = URL.createObjectURL(blob);
  const link = document.createElement('a');
  link.href = url;
  link.download = filename;
  document.body.appendChild(link);
  link.click();
  link.remove();
  // Give the browser time to start the download before the URL goes.
  setTimeout(() => URL.revokeObjectURL(url), 10000);
  return filename;
}
