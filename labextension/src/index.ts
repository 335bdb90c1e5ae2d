/**
 * promptscope's JupyterLab extension: a left-sidebar panel that lists the workspace's saved
 * sessions (served by the `promptscope.server` Jupyter server extension).
 */
import {
  ILayoutRestorer,
  JupyterFrontEnd,
  JupyterFrontEndPlugin
} from '@jupyterlab/application';
import { ICommandPalette, showErrorMessage } from '@jupyterlab/apputils';
import { INotebookTracker, NotebookActions } from '@jupyterlab/notebook';

import { promptscopeIcon } from './icon';
import { isValidId, loadCellSource } from './model';
import { INSERT_COMMAND, SessionsPanel } from './panel';

const OPEN_COMMAND = 'promptscope:open-sessions';
const REFRESH_COMMAND = 'promptscope:refresh-sessions';

const plugin: JupyterFrontEndPlugin<void> = {
  id: 'promptscope:sessions',
  description: 'Browse, reopen and export saved promptscope sessions.',
  autoStart: true,
  optional: [ILayoutRestorer, INotebookTracker, ICommandPalette],
  activate: (
    app: JupyterFrontEnd,
    restorer: ILayoutRestorer | null,
    notebooks: INotebookTracker | null,
    palette: ICommandPalette | null
  ) => {
    const panel = new SessionsPanel({ commands: app.commands });
    app.shell.add(panel, 'left', { rank: 650 });
    restorer?.add(panel, 'promptscope-sessions');

    app.commands.addCommand(OPEN_COMMAND, {
      label: 'Show promptscope Sessions',
      icon: promptscopeIcon,
      execute: () => app.shell.activateById(panel.id)
    });
    app.commands.addCommand(REFRESH_COMMAND, {
      label: 'Refresh promptscope Sessions',
      execute: () => panel.refresh()
    });
    app.commands.addCommand(INSERT_COMMAND, {
      label: 'Insert a cell that loads a promptscope session',
      describedBy: {
        args: {
          type: 'object',
          properties: { id: { type: 'string', description: 'the session id' } },
          required: ['id']
        }
      },
      execute: async args => {
        const id = String(args.id ?? '');
        if (!isValidId(id)) {
          await showErrorMessage('Cannot insert', `Not a session id: ${id}`);
          return;
        }
        const current = notebooks?.currentWidget;
        if (!current) {
          await showErrorMessage(
            'No notebook',
            'Open a notebook first: the cell is added below its active cell.'
          );
          return;
        }
        const notebook = current.content;
        NotebookActions.insertBelow(notebook);
        // The default type of a new cell is configurable; this one must be code.
        NotebookActions.changeCellType(notebook, 'code');
        notebook.activeCell?.model.sharedModel.setSource(loadCellSource(id));
        app.shell.activateById(current.id);
        notebook.activeCell?.editor?.focus();
      }
    });
    palette?.addItem({ command: OPEN_COMMAND, category: 'promptscope' });
    palette?.addItem({ command: REFRESH_COMMAND, category: 'promptscope' });
  }
};

export default plugin;
